"""Dry run: compile the train step for the configured shape on the devices present and report what it needs."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from llm_jax import metrics as metrics_lib
from llm_jax import steps as steps_lib
from llm_jax.model import ModelConfig


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


def report(cfg: ModelConfig, fns: steps_lib.StepFns, *, global_batch_size: int, seq_len: int,
           replicated_share: float) -> dict[str, Any]:
  """Compiles `fns.train` on abstract inputs and returns per-device memory, FLOPs and placements."""
  compiled = fns.lower_train(global_batch_size, seq_len).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  flops = metrics_lib.flops_per_token(cfg, seq_len)
  return {
      "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind,
      "micro_batches": fns.accum,
      "params_bytes_per_device": per_device_bytes(fns.abstract_state.params, fns.state_shardings.params),
      "opt_state_bytes_per_device": per_device_bytes(fns.abstract_state.opt_state,
                                                     fns.state_shardings.opt_state),
      "argument_bytes": getattr(memory, "argument_size_in_bytes", -1),
      "output_bytes": getattr(memory, "output_size_in_bytes", -1),
      "temp_bytes": getattr(memory, "temp_size_in_bytes", -1),
      "compiled_flops_per_device": float(cost.get("flops", -1.0)),
      "model_flops_per_step": flops["causal"] * global_batch_size * seq_len,
      "replicated_param_share": replicated_share,
      "largest_params": largest_arrays(fns.abstract_state.params, fns.state_shardings.params),
  }


def format_report(r: dict[str, Any]) -> str:
  gib = 1024**3
  lines = [
      f"dry run on {r['devices']} x {r['device_kind']}, {r['micro_batches']} micro-batch"
      f"{'es' if r['micro_batches'] > 1 else ''} per update",
      f"  parameters        {r['params_bytes_per_device'] / gib:10.3f} GiB per device",
      f"  optimizer state   {r['opt_state_bytes_per_device'] / gib:10.3f} GiB per device",
      f"  temporaries       {r['temp_bytes'] / gib:10.3f} GiB per device (compiled memory analysis)",
      f"  step arguments    {r['argument_bytes'] / gib:10.3f} GiB, outputs {r['output_bytes'] / gib:.3f} GiB",
      f"  FLOPs per step    {r['model_flops_per_step']:.3e} model (6N + attention, causal); "
      f"{r['compiled_flops_per_device']:.3e} per device by XLA (a scanned layer counted once)",
      f"  replicated share  {100 * r['replicated_param_share']:.1f}% of parameter bytes",
      "  largest parameters:",
  ]
  lines += [f"    {name:<40s} {str(shape):<24s} {spec}" for name, shape, spec in r["largest_params"]]
  return "\n".join(lines)
