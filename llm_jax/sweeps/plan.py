"""Sweeps: a base config plus grid/zipped overrides and seeds, expanded into runs that each own a workdir.

A sweep file is a small Python module (in `experiments/`) that sets these names:

    BASE = "experiments/sotu_small.py"          # config file every run starts from, optionally ":variant"
    SEEDS = (0, 1, 2)                           # every point runs once per seed (default: (0,))
    GRID = {"model.family": ["gpt2", "llama"]}  # cartesian product of these lists (default: {})
    ZIP = {"model.d_model": [128, 256],         # lists of equal length, taken together (default: {});
           "model.num_heads": [2, 4]}           #   with GRID as well, every grid point takes every zip entry
    OVERRIDES = {"num_train_steps": 300}        # applied to every run (default: {})

Keys are dotted config keys (`llm_jax/config.py`); a key may appear in one of GRID, ZIP and OVERRIDES
only, and never as `seed` (that is what SEEDS is for). Every run's resolved config is validated before
anything is launched, so a misspelt key or an impossible value fails the sweep at once.

Each run's workdir is `ROOT/<key=value,...,seed=S>` (values reduced to letters, digits and `_.+-`), and
its status comes from the run card `run.json` that the trainer writes (`llm_jax.sweeps.runcard`): a second
invocation skips finished runs and reruns the others, which the trainer resumes from their checkpoints.
A workdir whose run card records other values for the sweep's keys is refused, never silently reused.
Running a sweep writes `ROOT/sweep.json` (the sweep and every run's command), from which
`--report --root=ROOT` works without the sweep file.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from typing import Any
from typing import Callable

from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import workdir as workdir_lib
from llm_jax.sweeps import runcard

MANIFEST = "sweep.json"
_MAX_NAME = 200  # bytes; file systems allow 255 per path component


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A sweep file's contents; `path` is where it came from (for messages and the manifest)."""

  path: str
  base: str
  seeds: tuple[int, ...] = (0,)
  grid: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
  zipped: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def swept_keys(self) -> list[str]:
    return [*self.grid, *self.zipped]


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep: a point of the grid/zip, one seed, its workdir and its command."""

  name: str  # the workdir's name: "<key=value,...>,seed=S"
  variant: str  # the name without the seed: what the report averages over
  point: dict[str, Any]  # this run's swept values
  seed: int
  settings: dict[str, Any]  # every override this run passes: OVERRIDES, the point, the seed
  workdir: str
  command: list[str]
  # The settings as the run records them in config.json: derived values resolved (model.num_kv_heads=0 -> num_heads).
  resolved: dict[str, Any] = dataclasses.field(default_factory=dict)


def _as_lists(path: str, name: str, table: Any) -> dict[str, list[Any]]:
  if not isinstance(table, dict):
    raise errors.ConfigError(f"{name} in {path} must be a dict of config key -> list of values")
  for key, values in table.items():
    if not isinstance(values, (list, tuple)) or not values:
      raise errors.ConfigError(f"{name}[{key!r}] in {path} must be a non-empty list of values, got {values!r}")
  return {key: list(values) for key, values in table.items()}


# The names a sweep file sets (module docstring); any other upper-case name is a misspelling.
SWEEP_NAMES = ("BASE", "SEEDS", "GRID", "ZIP", "OVERRIDES")


def load_sweep(path: str) -> Sweep:
  """Reads a sweep file and validates it (keys, shapes, every run's resolved config)."""
  module = config_lib.load_python_file(path, "sweep file", "--sweep=experiments/ablation_family.py")
  unknown = sorted(name for name in vars(module) if name.isupper() and name not in SWEEP_NAMES)
  if unknown:
    raise errors.ConfigError(f"sweep file {path} sets {', '.join(unknown)}, which a sweep does not read; it reads "
                             f"{', '.join(SWEEP_NAMES)} (check the spelling)")
  if not isinstance(getattr(module, "BASE", None), str):
    raise errors.ConfigError(f"sweep file {path} has no BASE (the config file every run starts from); add BASE = "
                             "\"experiments/<config>.py\"")
  seeds = getattr(module, "SEEDS", (0,))
  if not isinstance(seeds, (list, tuple)) or not seeds or not all(isinstance(s, int) for s in seeds):
    raise errors.ConfigError(f"SEEDS in {path} must be a non-empty tuple of integers, got {seeds!r}")
  overrides = getattr(module, "OVERRIDES", {})
  if not isinstance(overrides, dict):
    raise errors.ConfigError(f"OVERRIDES in {path} must be a dict of config key -> value")
  sweep = Sweep(path=path, base=module.BASE, seeds=tuple(seeds),
                grid=_as_lists(path, "GRID", getattr(module, "GRID", {})),
                zipped=_as_lists(path, "ZIP", getattr(module, "ZIP", {})), overrides=dict(overrides))
  validate(sweep)
  return sweep


def base_config(base: str) -> Any:
  """The experiment config a `BASE` string names: `get_config()` of the file, or `get_config(variant)`."""
  try:
    return config_lib.from_file(base)
  except (ValueError, FileNotFoundError) as e:
    raise errors.ConfigError(f"BASE={base!r} (relative to where you run) does not give a config: {e}") from e


def validate(sweep: Sweep) -> None:
  """Raises ValueError (one line) unless every run of the sweep has a config the trainer accepts."""
  lengths = {len(v) for v in sweep.zipped.values()}
  if len(lengths) > 1:
    raise errors.ConfigError(f"ZIP lists in {sweep.path} have different lengths {sorted(lengths)}; make them equal")
  tables = {"GRID": sweep.grid, "ZIP": sweep.zipped, "OVERRIDES": sweep.overrides}
  known = set(config_lib.keys())
  seen: dict[str, str] = {}
  for table, keys in tables.items():
    for key in keys:
      if key == "seed":
        raise errors.ConfigError(f"{table} in {sweep.path} sets 'seed'; list the seeds in SEEDS instead")
      if key not in known:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise errors.ConfigError(f"sweep {sweep.path} sets unknown config key {key!r} in {table}{hint}; check its "
                                 "spelling against llm_jax/config.py")
      if key in seen:
        raise errors.ConfigError(f"config key {key!r} is in both {seen[key]} and {table} of {sweep.path}; keep it in "
                                 "one")
      seen[key] = table
  base = base_config(sweep.base)
  for point in points(sweep):
    config_lib.with_settings(base, {**sweep.overrides, **point, "seed": sweep.seeds[0]}, sweep.path)


def points(sweep: Sweep) -> list[dict[str, Any]]:
  """Every swept combination: the grid's cartesian product, each with every entry of the zipped lists."""
  grid = [dict(zip(sweep.grid, values)) for values in itertools.product(*sweep.grid.values())]
  n_zip = len(next(iter(sweep.zipped.values()))) if sweep.zipped else 1
  zipped = [{k: v[i] for k, v in sweep.zipped.items()} for i in range(n_zip)]
  return [{**g, **z} for g in grid for z in zipped]


def _safe(value: Any) -> str:
  return re.sub(r"[^A-Za-z0-9_.+-]", "-", str(value)) or "-"


def variant_name(point: dict[str, Any]) -> str:
  """`key=value,...` with file-system-safe values (shortened with a hash when too long); 'base' if empty."""
  name = ",".join(f"{k}={_safe(v)}" for k, v in point.items()) or "base"
  if len(name.encode()) > _MAX_NAME:
    digest = hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:12]
    name = f"{name[:_MAX_NAME - 13]}~{digest}"
  return name


def expand(sweep: Sweep, root: str, extra_args: tuple[str, ...] = ()) -> list[Run]:
  """Runs for every point and seed, with their workdirs and exact training commands.

  `extra_args` go to every training command (e.g. `--distributed`, so on a pod slice every worker
  runs the same sequence of multi-host runs).
  """
  runs = []
  base = base_config(sweep.base)
  for point in points(sweep):
    variant = variant_name(point)
    for seed in sweep.seeds:
      name = f"{variant},seed={seed}"
      workdir = os.path.join(root, name)
      settings = {**sweep.overrides, **point, "seed": seed}
      command = [sys.executable, "-m", "llm_jax.train", f"--config={sweep.base}", f"--workdir={workdir}",
                 *[f"--config.{k}={v}" for k, v in settings.items()], *extra_args]
      recorded = _flat_values(config_lib.with_settings(base, settings, sweep.path).record())
      runs.append(Run(name=name, variant=variant, point=point, seed=seed, settings=settings, workdir=workdir,
                      resolved={k: recorded.get(k, v) for k, v in settings.items()},
                      command=command))
  names = [r.name for r in runs]
  clash = next((n for n in names if names.count(n) > 1), None)
  if clash:
    raise errors.ConfigError(f"two runs of {sweep.path} map to the same workdir {clash!r} (values that differ only in "
                             "characters a file name cannot hold, or repeated SEEDS); make them distinct")
  return runs


def _same(recorded: Any, wanted: Any) -> bool:
  numbers = (int, float)
  if isinstance(recorded, numbers) and isinstance(wanted, numbers) and not isinstance(wanted, bool):
    return math.isclose(float(recorded), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
  return json.loads(json.dumps(recorded, default=str)) == json.loads(json.dumps(wanted, default=str))


def _flat_values(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for k, v in tree.items():
    flat.update(_flat_values(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return flat


def stale_settings(run: Run) -> dict[str, tuple[Any, Any]]:
  """{key: (recorded, wanted)} where the config the workdir's run recorded (config.json, derived values resolved)
  disagrees with this run's settings."""
  if not workdir_lib.has_run_config(run.workdir):
    return {}
  recorded = _flat_values(workdir_lib.read_run_config(run.workdir))
  return {k: (recorded.get(k), v) for k, v in run.settings.items()
          if not _same(recorded.get(k), run.resolved.get(k, v))}


def status(run: Run) -> str:
  """'new' (no run card), 'finished', or the card's status of an unfinished run ('stopped', 'failed', ...)."""
  card = runcard.read(run.workdir)
  return "new" if card is None else str(card.get("status", "unknown"))


def check_not_stale(runs: list[Run]) -> None:
  """Refuses a root whose workdirs were run with other values of the sweep's keys."""
  for run in runs:
    stale = stale_settings(run)
    if stale:
      diffs = ", ".join(f"{k}={old!r} (sweep: {new!r})" for k, (old, new) in stale.items())
      raise errors.ConfigError(f"workdir {run.workdir} was run with {diffs}; delete it or pass another --root")


def write_manifest(sweep: Sweep, runs: list[Run], root: str) -> None:
  """`ROOT/sweep.json`: the sweep (to re-expand it for reports) and every run's name and command."""
  os.makedirs(root, exist_ok=True)
  manifest = {"sweep": dataclasses.asdict(sweep),
              "runs": [{"name": r.name, "seed": r.seed, "command": r.command} for r in runs]}
  # Every worker of a pod slice writes the same manifest, maybe to shared storage: one temporary file each.
  tmp = os.path.join(root, f"{MANIFEST}.{socket.gethostname()}.{os.getpid()}.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2, default=str)
  os.replace(tmp, os.path.join(root, MANIFEST))


def read_manifest(root: str) -> Sweep:
  """The sweep that last ran under `root`."""
  path = os.path.join(root, MANIFEST)
  if not os.path.exists(path):
    raise errors.MissingFileError(f"{root} has no {MANIFEST} (a sweep writes it when it runs); pass the sweep's "
                                  "--root, or --sweep=FILE as well")
  with open(path, encoding="utf-8") as f:
    spec = json.load(f)["sweep"]
  return Sweep(path=spec["path"], base=spec["base"], seeds=tuple(spec["seeds"]), grid=spec["grid"],
               zipped=spec["zipped"], overrides=spec["overrides"])


def _duration(seconds: float) -> str:
  return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def _run_one(run: Run) -> str:
  os.makedirs(run.workdir, exist_ok=True)
  with open(os.path.join(run.workdir, "train.log"), "a", encoding="utf-8") as out:
    out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(run.command)}\n")
    out.flush()
    result = subprocess.run(run.command, stdout=out, stderr=subprocess.STDOUT, check=False)
  if result.returncode != 0:
    return f"failed (exit {result.returncode}; see {os.path.join(run.workdir, 'train.log')})"
  val_loss = ((runcard.read(run.workdir) or {}).get("final_metrics") or {}).get("val_loss")
  return "ok" + (f", validation loss {val_loss:.4f}" if isinstance(val_loss, float) else "")


def run_all(runs: list[Run], *, skip_finished: bool = True, log: Callable[[str], None] = print) -> dict[str, str]:
  """Runs every run that is not finished, one after another, each in its own process.

  A failing run is logged and the sweep goes on. With `skip_finished=False` finished runs are started
  too (the trainer then only samples): on a pod slice every worker must start the same runs, and only
  process 0 writes run cards, so the workers cannot all skip by reading them.
  """
  check_not_stale(runs)
  outcome = {}
  for i, run in enumerate(runs, 1):
    state = status(run)
    if skip_finished and state == "finished":
      log(f"[{i}/{len(runs)}] {run.name}: finished, skipped")
      outcome[run.name] = "skipped"
      continue
    log(f"[{i}/{len(runs)}] {run.name}: {'starting' if state == 'new' else f'resuming ({state})'}")
    started = time.perf_counter()
    outcome[run.name] = _run_one(run)
    log(f"[{i}/{len(runs)}] {run.name}: {outcome[run.name]} in {_duration(time.perf_counter() - started)}")
  return outcome
