"""The matmuls of one train-step shape measured alone on CPU: each dot under XLA (its default YNNPACK fusion, with
YNNPACK off, and in bfloat16), torch and numpy, and the attention's forward+backward by causal query blocks.

Command:  python tools/cpu_kernels.py [--batch=64 --length=256 --heads=6 --head_dim=64 --d_model=384
              --d_ff=1536 --repeats=5 --attention_repeats=12]   (defaults: the 10m shape of llm_jax/bench_shapes.py)
Method:   every dot is jitted alone (one `jnp.einsum`, float32 unless marked), warmed up, and timed --repeats times
          per implementation; the best call counts (load only ever slows a call down), as GFLOP/s = 2·M·N·K ÷ time.
          The attention part jits `llm_jax.attention.dot_product_attention`'s value and gradient at 1, 2 and 4
          blocks over a causal mask and alternates them --attention_repeats times: median time per block count and
          the median (range) of its speed ratio to one block over the repeats.
Hardware and results: BENCHMARKS.md ("A second machine kind", 2026-12-01).
"""

from __future__ import annotations

import statistics
import time
from typing import Any
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app
from absl import flags

from llm_jax.attention import attention_mask
from llm_jax.attention import dot_product_attention

_BATCH = flags.DEFINE_integer("batch", 64, "Sequences per step.")
_LENGTH = flags.DEFINE_integer("length", 256, "Slots per sequence.")
_HEADS = flags.DEFINE_integer("heads", 6, "Attention heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Width of a head.")
_D_MODEL = flags.DEFINE_integer("d_model", 384, "Model width.")
_D_FF = flags.DEFINE_integer("d_ff", 1536, "MLP hidden width.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per dot and implementation (the best counts).")
_ATTENTION_REPEATS = flags.DEFINE_integer("attention_repeats", 12, "Alternating rounds of the attention timing.")

# XLA compile options per variant: YNNPACK is XLA:CPU's default dot library; an empty fusion type sends dots to Eigen.
Case = tuple[str, tuple[int, ...], tuple[int, ...]]  # einsum spec, lhs shape, rhs shape
_XLA_VARIANTS = {"xla": ({}, jnp.float32), "xla_no_ynn": ({"xla_cpu_experimental_ynn_fusion_type": ""}, jnp.float32),
                 "xla_bf16": ({}, jnp.bfloat16)}


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def dot_cases(b: int, l: int, h: int, k: int, d: int, f: int) -> dict[str, Case]:
  """The step's dots as (einsum spec, lhs shape, rhs shape): the attention's batched dots over B·H, the MLP's
  forward, input gradient and weight gradient, and a projection's weight gradient."""
  n, bh = b * l, b * h
  return {
      "attention scores Q·Kᵀ": ("bij,bkj->bik", (bh, l, k), (bh, l, k)),
      "attention values P·V": ("bij,bjk->bik", (bh, l, l), (bh, l, k)),
      "attention dV = Pᵀ·dO": ("bji,bjk->bik", (bh, l, l), (bh, l, k)),
      "MLP forward x·W": ("ij,jk->ik", (n, d), (d, f)),
      "MLP input gradient dy·Wᵀ": ("ij,kj->ik", (n, f), (d, f)),
      "MLP weight gradient xᵀ·dy": ("ji,jk->ik", (n, d), (n, f)),
      "projection weight gradient xᵀ·dy": ("ji,jk->ik", (n, d), (n, d)),
  }


def time_dots(cases: dict[str, Case], repeats: int) -> dict[str, dict[str, float]]:
  """GFLOP/s of every case under each implementation (best of `repeats` calls)."""
  rng = np.random.default_rng(0)
  out: dict[str, dict[str, float]] = {}
  for name, (spec, lhs_shape, rhs_shape) in cases.items():
    lhs, rhs = rng.standard_normal(lhs_shape, np.float32), rng.standard_normal(rhs_shape, np.float32)
    contracted = {c for c in spec.split("->")[0].split(",")[0] if c not in spec.split("->")[1]}
    k = int(np.prod([lhs_shape[spec.index(c)] for c in contracted]))
    out_shape = jax.eval_shape(lambda x, y, spec=spec: jnp.einsum(spec, x, y), lhs, rhs).shape
    flop = 2 * float(np.prod(out_shape)) * k
    row = {}
    for variant, (options, dtype) in _XLA_VARIANTS.items():
      x, y = jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype)
      compiled = jax.jit(lambda x, y, spec=spec: jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)).lower(
          x, y).compile(options)
      row[variant] = flop / _best_seconds(lambda c=compiled, x=x, y=y: jax.block_until_ready(c(x, y)), repeats) / 1e9
    tx, ty = torch.from_numpy(lhs), torch.from_numpy(rhs)
    row["torch"] = flop / _best_seconds(lambda: torch.einsum(spec, tx, ty), repeats) / 1e9
    row["numpy"] = flop / _best_seconds(lambda: np.einsum(spec, lhs, rhs, optimize=True), repeats) / 1e9
    out[name] = row
    print(f"{name:36s} " + "  ".join(f"{v} {g:6.1f}" for v, g in row.items()) + "  GFLOP/s", flush=True)
  return out


def time_attention(b: int, l: int, h: int, k: int, repeats: int) -> dict[int, list[float]]:
  """Seconds of the attention's value-and-gradient per call, for 1, 2 and 4 causal query blocks, alternating."""
  rng = np.random.default_rng(0)
  q, key, v = (jnp.asarray(rng.standard_normal((b, l, h, k), np.float32)) for _ in range(3))
  slots = jnp.broadcast_to(jnp.arange(l), (b, l))
  mask = attention_mask(slots, slots, None, None)
  fns = {}
  for n in (1, 2, 4):
    fns[n] = jax.jit(jax.value_and_grad(
        lambda q, key, v, n=n: jnp.sum(dot_product_attention(q, key, v, mask, blocks=n) ** 2), argnums=(0, 1, 2)))
    jax.block_until_ready(fns[n](q, key, v))
  seconds: dict[int, list[float]] = {n: [] for n in fns}
  for _ in range(repeats):
    for n, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(q, key, v))
      seconds[n].append(time.perf_counter() - start)
  for n, times in seconds.items():
    ratios = [one / t for one, t in zip(seconds[1], times)]
    print(f"attention forward+backward, {n} block(s): median {1000 * statistics.median(times):.1f} ms; "
          f"vs 1 block {statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})", flush=True)
  return seconds


def main(argv: list[str]) -> None:
  del argv
  b, l, h, k = _BATCH.value, _LENGTH.value, _HEADS.value, _HEAD_DIM.value
  print(f"shape: batch {b} x {l}, {h} heads of {k}, width {_D_MODEL.value}, MLP {_D_FF.value}; torch on "
        f"{torch.get_num_threads()} threads")
  time_dots(dot_cases(b, l, h, k, _D_MODEL.value, _D_FF.value), _REPEATS.value)
  time_attention(b, l, h, k, _ATTENTION_REPEATS.value)


if __name__ == "__main__":
  app.run(main)
