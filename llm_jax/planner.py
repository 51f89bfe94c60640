"""The planner behind `python -m llm_jax.plan` and `--config.plan=True`: which mesh, remat policy and micro-batch to
train with on a TPU slice, ranked by the roofline's estimated tokens/s, from real compiles of the step through libtpu.

For each mesh split and remat policy it looks for the largest micro-batch per chip that fits in two or three compiles:
it compiles the smallest, scales its temporaries in proportion to guess the largest that fits, compiles that, and
steps down until one fits. Temporaries have a part that does not grow with the batch, so the guess errs small: a
larger micro-batch than the one found may fit (ask for it with --micro_batches).
Each candidate's row is kept under ~/.cache/llm_jax/plan/ (keyed by its config and the compiler versions), so a rerun
reads what it compiled before; JAX's persistent compilation cache cannot serve these compiles (a compile-only TPU
executable loads only with a TPU client). (`llm_jax.sweeps.plan` is another thing:
the sweep file format.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import sys
import time
from typing import Any
from typing import Sequence

from llm_jax import dryrun
from llm_jax import errors
from llm_jax import sharding
from llm_jax import tpu
from llm_jax import trainer
from llm_jax.run_config import RunConfig

MESHES = ("fsdp", "fsdp_tensor2", "data")  # the default search: see mesh_shape
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
REMATS = ("none", "dots", "full")
CACHE_DIR = os.path.expanduser("~/.cache/llm_jax")  # candidates' rows under plan/
def mesh_shape(name: str, chips: int, num_slices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) of a mesh split name for `chips` chips over `num_slices` slices (data spans the slices)."""
  tensor = int(re.fullmatch(r"fsdp_tensor(\d+)", name)[1]) if re.fullmatch(r"fsdp_tensor(\d+)", name) else 1
  if name == "data":
    return chips, 1, 1
  if name != "fsdp" and tensor == 1:
    raise errors.ConfigError(f"--meshes names {name!r}; use fsdp, data or fsdp_tensorN (e.g. fsdp_tensor2)")
  if chips % (num_slices * tensor):
    raise errors.ConfigError(f"mesh {name!r} needs a multiple of {num_slices * tensor} chips, not {chips}; drop it")
  return num_slices, chips // (num_slices * tensor), tensor


def _candidate(run: RunConfig, shape: tuple[int, int, int], remat: str, micro: int) -> RunConfig:
  data_parallel = shape[0] * shape[1]
  return dataclasses.replace(
      run, mesh=sharding.MeshConfig(*shape), model=dataclasses.replace(run.model, remat_policy=remat),
      step=dataclasses.replace(run.step, global_batch_size=micro * data_parallel, grad_accum_steps=1),
      evals=dataclasses.replace(run.evals, eval_batch_size=data_parallel), plan=False, dry_run=True, platform=None)


def flags_for(shape: tuple[int, int, int], remat: str, global_batch_size: int) -> str:
  """The command-line flags that select a candidate."""
  return (f"--config.mesh.data={shape[0]} --config.mesh.fsdp={shape[1]} --config.mesh.tensor={shape[2]} "
          f"--config.model.remat_policy={remat} --config.global_batch_size={global_batch_size} "
          "--config.grad_accum_steps=1")


def _cache_path(candidate: RunConfig, cache_dir: str) -> str:
  """Where a candidate's row is kept: keyed by the whole config and the versions of the compiler stack."""
  versions = {name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax", "libtpu")}
  key = json.dumps([candidate.record(), versions, sys.modules["llm_jax"].__version__], sort_keys=True, default=str)
  return os.path.join(cache_dir, "plan", hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def _try(run: RunConfig, shape: tuple[int, int, int], remat: str, micro: int,
         log: Any, cache_dir: str | None) -> dict[str, Any]:
  """One candidate's row: compiled now, or read back from `cache_dir` where the same candidate was compiled before
  (JAX's persistent cache cannot serve compile-only TPU executables: they load only with a TPU client)."""
  candidate = _candidate(run, shape, remat, micro)
  path = _cache_path(candidate, cache_dir) if cache_dir else None
  if path and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      row = json.load(f)
    log(f"  {row['mesh']} remat={remat} micro-batch {micro}: {'fits' if row['fits'] else 'does not fit'} (cached)")
    return row
  row = _compile_row(candidate, shape, remat, micro, log)
  if path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(row, f)
  return row


def _compile_row(candidate: RunConfig, shape: tuple[int, int, int], remat: str, micro: int,
                 log: Any) -> dict[str, Any]:
  start = time.perf_counter()
  row = {"mesh": dict(zip(sharding.MESH_AXES, shape)), "remat": remat, "micro_batch_per_chip": micro}
  try:
    _, r, _ = trainer.compile_report(candidate)
  except dryrun.DoesNotFit as e:
    row.update(fits=False, reason=str(e), compile_s=time.perf_counter() - start)
  else:
    est = r["estimate"]
    row.update(fits=True, global_batch_size=r["global_batch_size"], peak_gib=r["peak_bytes"] / dryrun.GIB,
               temp_bytes=r["temp_bytes"], hbm_gib=r["hbm_bytes"] / dryrun.GIB, step_ms=est.step_s * 1e3,
               bound=est.bound, tokens_per_s=r["estimated_tokens_per_s"], mfu=r["estimated_mfu"],
               flags=flags_for(shape, remat, r["global_batch_size"]), compile_s=time.perf_counter() - start)
  verdict = f"fits, {row['peak_gib']:.2f} GiB, {row['tokens_per_s']:,.0f} tokens/s" if row["fits"] else "does not fit"
  log(f"  {row['mesh']} remat={remat} micro-batch {micro}: {verdict} ({row['compile_s']:.0f} s)")
  return row


def largest_fitting(run: RunConfig, shape: tuple[int, int, int], remat: str,
                    micro_batches: Sequence[int], log: Any, cache_dir: str | None = None) -> list[dict[str, Any]]:
  """Every candidate compiled while looking for the largest micro-batch of `micro_batches` (ascending) that fits: the
  smallest, then the proportional guess and the ones below it until one fits."""
  tried = [_try(run, shape, remat, micro_batches[0], log, cache_dir)]
  if not tried[0]["fits"]:
    return tried
  first = tried[0]
  # Temporaries grow about linearly with the micro-batch; the state does not.
  per_row = max(first["temp_bytes"], 1) / micro_batches[0]
  room = first["hbm_gib"] * dryrun.GIB - (first["peak_gib"] * dryrun.GIB - first["temp_bytes"])
  guess = max([i for i, m in enumerate(micro_batches) if m * per_row <= room] or [0])
  for i in range(guess, 0, -1):
    tried.append(_try(run, shape, remat, micro_batches[i], log, cache_dir))
    if tried[-1]["fits"]:
      break
  return tried


def plan(run: RunConfig, micro_batches: Sequence[int] = MICRO_BATCHES,
         remats: Sequence[str] = REMATS, meshes: Sequence[str] = MESHES,
         log: Any = print, cache_dir: str | None = None) -> list[dict[str, Any]]:
  """Every compiled candidate for `run.topology`, those that fit first, ranked by estimated tokens/s; with
  `cache_dir`, candidates compiled before are read back instead of compiled."""
  if not run.topology:
    raise errors.ConfigError("the planner compiles for a TPU slice: pass --config.topology=<slice>, e.g. v5e-8")
  slice_ = tpu.parse_slice(run.topology, run.num_slices)
  shapes = dict.fromkeys(mesh_shape(name, slice_.total_chips, slice_.num_slices) for name in meshes)
  rows = []
  for shape in shapes:
    for remat in remats:
      rows += largest_fitting(run, shape, remat, sorted(micro_batches), log, cache_dir)
  return sorted(rows, key=lambda r: (not r["fits"], -r.get("tokens_per_s", 0.0)))


def format_table(rows: Sequence[dict[str, Any]], topology: str) -> str:
  fitting = [r for r in rows if r["fits"]]
  lines = [f"plan for {topology}: {len(fitting)} of {len(rows)} compiled candidates fit; ranked by ESTIMATED tokens/s "
           "(roofline, not a measurement)",
           f"  {'tokens/s':>12s} {'MFU':>6s} {'step ms':>9s} {'bound':<16s} {'GiB/chip':>8s}  flags"]
  lines += [f"  {r['tokens_per_s']:12,.0f} {100 * r['mfu']:5.1f}% {r['step_ms']:9.1f} {r['bound']:<16s} "
            f"{r['peak_gib']:8.2f}  {r['flags']}" for r in fitting]
  if not fitting:
    lines.append(f"  nothing fits; the smallest candidate's refusal: {rows[-1]['reason']}" if rows else
                 "  no candidates")
  return "\n".join(lines)


def run(run_cfg: RunConfig, micro_batches: Sequence[int], remats: Sequence[str],
        meshes: Sequence[str], json_path: str | None, cache_dir: str) -> list[dict[str, Any]]:
  """The planner with its cache of candidates under `cache_dir`: prints progress and the ranked table."""
  rows = plan(run_cfg, micro_batches, remats, meshes, cache_dir=cache_dir)
  print(format_table(rows, run_cfg.topology))
  if json_path:
    with open(json_path, "w", encoding="utf-8") as f:
      json.dump({"topology": run_cfg.topology, "num_slices": run_cfg.num_slices, "candidates": rows}, f, indent=1)
  return rows
