"""Dry run: compile the train step for the configured shape, on the devices present or for a named TPU slice
(`llm_jax.tpu`), and report what it needs per chip and how fast it should run (`llm_jax.roofline`).

A step that does not fit is refused in one line that names what would make it fit, not a compiler traceback.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding

from llm_jax import errors
from llm_jax import metrics as metrics_lib
from llm_jax import roofline
from llm_jax import sharding
from llm_jax import steps as steps_lib
from llm_jax import tpu
from llm_jax.model_config import ModelConfig

GIB = 1024**3


class DoesNotFit(errors.ConfigError):
  """The step needs more memory per chip than the chip has; the message says what would fit."""


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
  """Bytes one device holds of a sharded tree (the largest shard of each leaf)."""
  total = 0
  flat_sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for leaf, sh in zip(jax.tree.leaves(abstract_tree), flat_sh):
    total += math.prod(sh.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


def largest_arrays(abstract_params: Any, shardings: Any, top: int = 6) -> list[tuple[str, tuple, str]]:
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  rows = [(math.prod(leaf.shape), jax.tree_util.keystr(path), leaf.shape, str(sh.spec))
          for (path, leaf), sh in zip(flat, flat_sh)]
  return [(name, shape, spec) for _, name, shape, spec in sorted(rows, reverse=True)[:top]]


def _gib_figures(message: str) -> list[float]:
  """The sizes a compiler out-of-memory message quotes ('218.98G', '15.75G', '512.00M'), in GiB, in order."""
  scale = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}
  return [float(v) * scale[u] for v, u in re.findall(r"(\d+(?:\.\d+)?)\s*([KMGT])i?B?\b", message)]


def fit_advice(message: str, *, state_bytes: int, rows_per_device: int, accum: int, global_batch_size: int,
               data_parallel: int, remat: str) -> str:
  """What would make a step that ran out of memory fit, from the compiler's message: fewer rows per micro-batch
  (more micro-batches, or a smaller batch) when temporaries overflow, more state sharding when the state alone does."""
  figures = _gib_figures(message)
  if len(figures) < 2:
    return "raise grad_accum_steps, lower global_batch_size, use remat_policy=full, or shard over more chips"
  needed, available = figures[0] * GIB, figures[1] * GIB
  state = float(state_bytes)
  if state >= available:
    return (f"the parameters and optimizer state alone ({state / GIB:.2f} GiB per chip) exceed it: shard them over "
            f"at least {max(2, math.ceil(state / available))}x more chips "
            "(mesh.fsdp, or a larger slice)")
  # Some messages quote the temporaries alone, others everything the step holds.
  temporaries = needed if "temporar" in message else max(needed - state, 1.0)
  rows_fit = int(rows_per_device * (available - state) / temporaries)
  options = []
  if rows_fit >= 1:
    splits = [k for k in range(1, rows_per_device + 1) if rows_per_device % k == 0 and rows_per_device // k <= rows_fit]
    if splits:
      k = splits[0] * accum
      options.append(f"grad_accum_steps={k} (micro-batches of {global_batch_size // k // data_parallel} sequences "
                     "per data-parallel chip)")
    options.append(f"global_batch_size={rows_fit * data_parallel * accum} (about {rows_fit} per chip)")
  if rows_fit < 1:
    # Not even one sequence per chip: the state and one row's temporaries must spread over more chips.
    one_row = state + temporaries / rows_per_device
    options.append(f"about {max(2, math.ceil(one_row / available))}x the chips (a larger slice, mesh.fsdp)")
  if remat != "full":
    options.append("model.remat_policy=full (less memory for more compute)")
  return "try " + " or ".join(options)


def compile_train(fns: steps_lib.StepFns, *, global_batch_size: int, seq_len: int, slice_name: str, mesh: Mesh,
                  remat: str) -> tuple[jax.stages.Lowered, jax.stages.Compiled]:
  """The lowered and compiled train step; a compiler out-of-memory becomes one DoesNotFit line."""
  lowered = fns.lower_train(global_batch_size, seq_len)
  try:
    return lowered, lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    state = (per_device_bytes(fns.abstract_state.params, fns.state_shardings.params)
             + per_device_bytes(fns.abstract_state.opt_state, fns.state_shardings.opt_state))
    data_parallel = sharding.data_parallel_size(mesh.shape)
    rows = global_batch_size // fns.accum // data_parallel
    advice = fit_advice(message, state_bytes=state, rows_per_device=rows, accum=fns.accum,
                        global_batch_size=global_batch_size, data_parallel=data_parallel, remat=remat)
    raise DoesNotFit(f"does not fit on {slice_name}: {message.removeprefix('RESOURCE_EXHAUSTED: ').rstrip('.')}; "
                     f"{advice}") from None


def report(cfg: ModelConfig, fns: steps_lib.StepFns, mesh: Mesh, *, global_batch_size: int, seq_len: int,
           replicated_share: float, slice_: tpu.Slice | None = None, remat: str = "") -> dict[str, Any]:
  """Compiles `fns.train` on abstract inputs for `mesh` and returns per-device memory, FLOPs, collectives, placements
  and, for a chip in the datasheet table, the roofline estimate."""
  devices = list(mesh.devices.flat)
  kind = devices[0].device_kind
  chip = slice_.chip if slice_ else tpu.chip_for_kind(kind)
  name = slice_.name + (f" x {slice_.num_slices} slices" if slice_ and slice_.num_slices > 1 else "") if slice_ \
      else f"{len(devices)} x {kind}"
  lowered, compiled = compile_train(fns, global_batch_size=global_batch_size, seq_len=seq_len, slice_name=name,
                                    mesh=mesh, remat=remat)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  lowered_text = lowered.as_text()
  dots, dots_once = roofline.dot_flops(lowered_text), roofline.dot_flops(lowered_text, trip_count=False)
  raw_flops = float(cost.get("flops", 0.0))
  flops = raw_flops + (dots - dots_once) / len(devices)  # the loop trips XLA's count leaves out
  params_bytes = per_device_bytes(fns.abstract_state.params, fns.state_shardings.params)
  hlo = roofline.read_hlo(compiled.as_text(), len(devices))
  peak = getattr(memory, "peak_memory_in_bytes", 0) or (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                                        - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  r = {
      "target": name,
      "devices": len(devices),
      "device_kind": kind,
      "mesh": dict(mesh.shape),
      "num_slices": slice_.num_slices if slice_ else 1,
      "micro_batches": fns.accum,
      "global_batch_size": global_batch_size,
      "seq_len": seq_len,
      "params_bytes_per_device": params_bytes,
      "opt_state_bytes_per_device": per_device_bytes(fns.abstract_state.opt_state, fns.state_shardings.opt_state),
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      "peak_bytes": peak,
      "compiled_flops_per_device": raw_flops,
      "flops_per_device": flops,
      "dot_flops_per_step": dots,
      "model_flops_per_step": metrics_lib.flops_per_token(cfg, seq_len)["causal"] * global_batch_size * seq_len,
      "compiled_bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
      "bytes_accessed_per_device": hlo.hbm_bytes,
      "collectives": hlo.collectives,
      "replicated_param_share": replicated_share,
      "largest_params": largest_arrays(fns.abstract_state.params, fns.state_shardings.params),
      "chip": chip,
  }
  if chip is not None:
    r.update(_estimate(r, chip))
  return r


def _estimate(r: dict[str, Any], chip: tpu.Chip) -> dict[str, Any]:
  ici = sum(c.moved_bytes for c in r["collectives"].values())
  k = r["num_slices"]
  # Across slices only the data-parallel gradient reduction travels: each chip's gradient shard, all-reduced over
  # the k slices (2(k-1)/k of it sent), in float32 like the parameters.
  dcn = 2 * r["params_bytes_per_device"] * (k - 1) / k if k > 1 else None
  est = roofline.estimate(chip, r["flops_per_device"], r["bytes_accessed_per_device"], ici, dcn)
  tokens = r["global_batch_size"] * r["seq_len"]
  return {"estimate": est, "estimated_mfu": roofline.mfu(r["model_flops_per_step"], r["devices"], chip, est.step_s),
          "estimated_tokens_per_s": tokens / est.step_s, "hbm_bytes": chip.hbm_bytes,
          "headroom_bytes": chip.hbm_bytes - r["peak_bytes"]}


def format_chip(chip: tpu.Chip) -> str:
  return (f"  chip {chip.generation}: {chip.hbm_bytes / GIB:.0f} GiB HBM, {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s "
          f"bf16, HBM {chip.hbm_bytes_per_s / 1e9:.0f} GB/s, ICI {chip.ici_bytes_per_s / 1e9:.0f} GB/s bidirectional "
          f"({chip.ici_ports} ports){f', DCN {chip.dcn_bytes_per_s / 1e9:.2f} GB/s' if chip.dcn_bytes_per_s else ''}"
          f"\n    source: {chip.source}")


def format_report(r: dict[str, Any]) -> str:
  unit = "chip" if r["chip"] is not None else "device"
  chips = f" ({r['devices']} x {r['device_kind']})" if r["chip"] is not None else ""
  lines = [
      f"dry run on {r['target']}{chips}, {r['micro_batches']} micro-batch{'es' if r['micro_batches'] > 1 else ''} "
      f"per update; mesh {r['mesh']}",
      f"  parameters        {r['params_bytes_per_device'] / GIB:10.3f} GiB per {unit}",
      f"  optimizer state   {r['opt_state_bytes_per_device'] / GIB:10.3f} GiB per {unit}",
      f"  temporaries       {r['temp_bytes'] / GIB:10.3f} GiB per {unit} (compiled memory analysis)",
      f"  step arguments    {r['argument_bytes'] / GIB:10.3f} GiB, outputs {r['output_bytes'] / GIB:.3f} GiB",
  ]
  if r["chip"] is not None:
    lines.append(f"  peak              {r['peak_bytes'] / GIB:10.3f} GiB of {r['hbm_bytes'] / GIB:.0f} GiB HBM: "
                 f"{r['headroom_bytes'] / GIB:.2f} GiB headroom")
  else:
    lines.append(f"  peak              {r['peak_bytes'] / GIB:10.3f} GiB per device")
  lines += [
      f"  FLOPs per step    {r['model_flops_per_step']:.3e} model (6N + attention, causal); "
      f"{r['flops_per_device']:.3e} per {unit} compiled, loop trips counted "
      f"(XLA's own count {r['compiled_flops_per_device']:.3e}: a scanned layer once)",
      f"  replicated share  {100 * r['replicated_param_share']:.1f}% of parameter bytes",
      "  collectives per step (count, result GiB per " + unit + ", GiB sent per " + unit + "):",
  ]
  lines += [f"    {c.kind:<19s} {c.count:6d} {c.bytes / GIB:10.3f} {c.moved_bytes / GIB:10.3f}"
            for c in r["collectives"].values()] or ["    none"]
  if r["chip"] is not None:
    est = r["estimate"]
    terms = ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in est.terms.items())
    lines += [format_chip(r["chip"]),
              f"  ESTIMATE (roofline, not a measurement): step {est.step_s * 1e3:.3g} ms, bound by {est.bound} "
              f"({terms}); {r['estimated_tokens_per_s']:,.0f} tokens/s, MFU {100 * r['estimated_mfu']:.1f}%",
              "    leaves out: imperfect overlap of the terms, kernel efficiency below peak, latency of small "
              "collectives, host input and step dispatch; its HBM term also counts buffers kept on chip (VMEM)"]
  lines.append("  largest parameters:")
  lines += [f"    {name:<40s} {str(shape):<24s} {spec}" for name, shape, spec in r["largest_params"]]
  return "\n".join(lines)
