"""Sweeps: a base config plus grid/zipped overrides and seeds, expanded into runs that each own a workdir.

A sweep file is a small Python module in `experiments/`:

    BASE = "experiments/sotu_small.py"          # config file, optionally with ":variant"
    SEEDS = (0, 1, 2)                           # every point runs once per seed
    GRID = {"model.family": ["gpt2", "llama"]}  # cartesian product of these lists
    ZIP = {}                                    # lists of equal length, taken together
    OVERRIDES = {"num_train_steps": 300}        # applied to every run

Each run's workdir is `ROOT/<key=value,...,seed=S>`; its status comes from the run card `run.json`
that the trainer writes (`llm_jax.runcard`), so a second invocation skips finished runs and the
trainer itself resumes unfinished ones from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import re
import subprocess
import sys
from typing import Any

from llm_jax import config as config_lib
from llm_jax import runcard


@dataclasses.dataclass(frozen=True)
class Sweep:
  base: str
  seeds: tuple[int, ...]
  grid: dict[str, list[Any]]
  zipped: dict[str, list[Any]]
  overrides: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Run:
  name: str  # "<key=value,...>,seed=S": the workdir name
  variant: str  # the name without the seed: what seeds are averaged over
  point: dict[str, Any]  # the swept values of this run
  seed: int
  workdir: str
  command: list[str]


def load_sweep(path: str) -> Sweep:
  """Reads a sweep file and checks every override key against the config defaults."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"sweep file {path} does not exist; pass --sweep=experiments/<name>.py")
  spec = importlib.util.spec_from_file_location("llm_jax_sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "BASE"):
    raise ValueError(f"sweep file {path} has no BASE (the config file every run starts from)")
  sweep = Sweep(base=module.BASE, seeds=tuple(getattr(module, "SEEDS", (0,))),
                grid=dict(getattr(module, "GRID", {})), zipped=dict(getattr(module, "ZIP", {})),
                overrides=dict(getattr(module, "OVERRIDES", {})))
  lengths = {len(v) for v in sweep.zipped.values()}
  if len(lengths) > 1:
    raise ValueError(f"ZIP lists in {path} have different lengths {sorted(lengths)}; make them equal")
  known = set(_flat_keys(config_lib.get_config()))
  for key in [*sweep.grid, *sweep.zipped, *sweep.overrides]:
    if key not in known:
      raise ValueError(f"sweep {path} overrides unknown config key {key!r}; check its spelling against "
                       "llm_jax/config.py")
  if not os.path.exists(sweep.base.split(":")[0]):
    raise FileNotFoundError(f"BASE={sweep.base!r} in {path} does not exist")
  return sweep


def _flat_keys(c: Any, prefix: str = "") -> list[str]:
  keys = []
  for k, v in c.items():
    keys += _flat_keys(v, f"{prefix}{k}.") if hasattr(v, "items") else [f"{prefix}{k}"]
  return keys


def _safe(value: Any) -> str:
  return re.sub(r"[^A-Za-z0-9_.+-]", "-", str(value))


def points(sweep: Sweep) -> list[dict[str, Any]]:
  """Every swept combination: the grid's cartesian product times the zipped lists."""
  grid = [dict(zip(sweep.grid, values)) for values in itertools.product(*sweep.grid.values())]
  n_zip = len(next(iter(sweep.zipped.values()))) if sweep.zipped else 1
  zipped = [{k: v[i] for k, v in sweep.zipped.items()} for i in range(n_zip)]
  return [{**g, **z} for g in grid for z in zipped]


def expand(sweep: Sweep, root: str, extra_args: tuple[str, ...] = ()) -> list[Run]:
  """Runs for every point and seed, with their workdirs and the exact training commands.

  `extra_args` go to every training command (e.g. `--distributed`, so on a pod slice every worker
  runs the same sequence of multi-host runs).
  """
  runs = []
  for point in points(sweep):
    variant = ",".join(f"{k}={_safe(v)}" for k, v in point.items()) or "base"
    for seed in sweep.seeds:
      name = f"{variant},seed={seed}"
      workdir = os.path.join(root, name)
      settings = {**sweep.overrides, **point, "seed": seed}
      command = [sys.executable, "-m", "llm_jax.train", f"--config={sweep.base}", f"--workdir={workdir}",
                 *[f"--config.{k}={v}" for k, v in settings.items()], *extra_args]
      runs.append(Run(name=name, variant=variant, point=point, seed=seed, workdir=workdir, command=command))
  return runs


def status(run: Run) -> str:
  """'finished', 'unfinished' (started, will resume) or 'new'."""
  card = runcard.read(run.workdir)
  if card is None:
    return "new"
  return "finished" if card.get("status") == "finished" else "unfinished"


def run_all(runs: list[Run], *, log=print) -> dict[str, str]:
  """Runs every run that is not finished, one after another, each in its own process."""
  outcome = {}
  for i, run in enumerate(runs, 1):
    state = status(run)
    if state == "finished":
      log(f"[{i}/{len(runs)}] {run.name}: finished, skipped")
      outcome[run.name] = "skipped"
      continue
    log(f"[{i}/{len(runs)}] {run.name}: {'resuming' if state == 'unfinished' else 'starting'}")
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, "train.log"), "a", encoding="utf-8") as out:
      result = subprocess.run(run.command, stdout=out, stderr=subprocess.STDOUT, check=False)
    outcome[run.name] = "ok" if result.returncode == 0 else f"failed (exit {result.returncode}, see train.log)"
    log(f"[{i}/{len(runs)}] {run.name}: {outcome[run.name]}")
  return outcome
