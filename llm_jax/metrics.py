"""Metrics: masked cross-entropy and accuracy, perplexity, model FLOPs per token, MFU and the peak it divides by.

All are pure functions except the peak, which on devices without a datasheet figure is measured by timing matmuls.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.model import count_non_embedding_params
from llm_jax.model_config import ModelConfig

# Dense bf16 datasheet peaks per chip, by `device_kind` prefix (lower-cased).
DATASHEET_PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "nvidia h200": 989e12,
    "nvidia h100": 989e12,
    "nvidia a100": 312e12,
}


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Summed masked next-token NLL, the number of counted tokens, and the summed correct guesses."""
  logits = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  nll_BxL = log_z_BxL - target_logit_BxL
  mask = mask_BxL.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets_BxL).astype(jnp.float32)
  return jnp.sum(nll_BxL * mask), jnp.sum(mask), jnp.sum(correct * mask)


def z_loss_sum(logits_BxLxV: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """Summed masked log(Z)², Z the softmax normaliser: the z-loss (PaLM) that keeps log(Z) near 0."""
  log_z_BxL = jax.nn.logsumexp(logits_BxLxV.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.square(log_z_BxL) * mask_BxL.astype(jnp.float32))


# exp() of larger losses overflows float64; such a run has diverged and its perplexity is shown capped.
_MAX_LOG_PERPLEXITY = 700.0


def perplexity(loss: float) -> float:
  """exp(loss) of a mean loss in nats, capped at exp(700) so a diverged run still logs a number."""
  return math.exp(min(loss, _MAX_LOG_PERPLEXITY))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
  """Training FLOPs per token (forward + backward = 3 × forward).

  `standard` = 6·N + 12·n_layers·T·D with N the non-embedding parameters (the published
  convention, attention counted as if not causal, output projection left out).
  `causal` = 6·(N + D·V) + 6·n_layers·T·D: what the model really computes: the vocabulary
  projection included and the causal half of the attention scores only. MFU uses `causal`.
  """
  n = count_non_embedding_params(cfg)
  attn_width = cfg.num_heads * cfg.head_dim
  standard = 6 * n + 12 * cfg.num_layers * seq_len * attn_width
  causal = 6 * (n + cfg.d_model * cfg.vocab_size) + 6 * cfg.num_layers * seq_len * attn_width
  return {"standard": float(standard), "causal": float(causal), "non_embedding_params": float(n)}


def median_seconds(fn, *args, repeats: int = 5) -> float:
  """Median wall time of `fn(*args)` to completion, after one untimed call (compilation)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """Achieved float32 FLOP/s of an n³ XLA matmul on the first device (median of repeats): accelerators' fallback."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  a, b = jax.device_put(a, jax.devices()[0]), jax.device_put(b, jax.devices()[0])
  return 2 * n**3 / median_seconds(jax.jit(lambda x, y: x @ y), a, b, repeats=repeats)


def _rates(fn, n: int, warmup: int, repeats: int) -> tuple[float, ...]:
  """FLOP/s of each of `repeats` timed calls of an n³ matmul `fn()`, after `warmup` untimed ones."""
  for _ in range(warmup):
    fn()
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    rates.append(2 * n**3 / (time.perf_counter() - start))
  return tuple(rates)


def _xla_matmul_rates(n: int, warmup: int, repeats: int) -> tuple[float, ...]:
  a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32), jax.devices()[0])
  b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.float32), jax.devices()[0])
  matmul = jax.jit(lambda x, y: x @ y)
  return _rates(lambda: jax.block_until_ready(matmul(a, b)), n, max(warmup, 1), repeats)  # warm-up 1 compiles


def _numpy_matmul_rates(n: int, warmup: int, repeats: int) -> tuple[float, ...]:
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
  out = np.empty((n, n), np.float32)
  return _rates(lambda: np.matmul(a, b, out=out), n, warmup, repeats)


@dataclasses.dataclass(frozen=True)
class CpuPeak:
  """The CPU peak for MFU: the best float32 matmul rate seen, and every sample behind it."""

  flops_per_s: float
  winner: str  # 'xla' or 'numpy'
  samples: dict[str, tuple[float, ...]]  # FLOP/s of each timed matmul, by implementation
  n: int

  def describe(self) -> str:
    """One line: where the figure came from and the spread (min/median/max GFLOP/s) of each implementation."""
    spread = "; ".join(f"{name} min/median/max {min(r) / 1e9:.0f}/{np.median(r) / 1e9:.0f}/{max(r) / 1e9:.0f}"
                       for name, r in self.samples.items())
    counts = " + ".join(f"{len(r)} {name}" for name, r in self.samples.items())
    return f"best of {counts} float32 {self.n}³ matmuls measured now, {self.winner} won; {spread} GFLOP/s"


@functools.cache
def measure_cpu_peak(n: int = 2048, warmup: int = 1, repeats: int = 3) -> CpuPeak:
  """The max over warmed-up XLA and numpy (BLAS) float32 n³ matmuls: about 1 s, once per process.

  The max, not the median: load from other processes only ever slows a sample down, so the fastest one
  is the closest to what the cores can do, and the denominator no longer moves with the machine's noise.
  numpy is timed too because its BLAS reaches more of the hardware than XLA:CPU's own dot does.
  """
  samples = {"xla": _xla_matmul_rates(n, warmup, repeats), "numpy": _numpy_matmul_rates(n, warmup, repeats)}
  winner = max(samples, key=lambda name: max(samples[name]))
  return CpuPeak(flops_per_s=max(samples[winner]), winner=winner, samples=samples, n=n)


def peak_flops_total(per_device: float = 0.0) -> tuple[float, str]:
  """The peak FLOP/s of all devices together, used for MFU, and where the figure came from.

  On CPU the simulated devices share the host's cores, so the peak is the host's best float32 matmul
  (`measure_cpu_peak`), whatever the device count; the source string carries its spread.
  """
  num = jax.device_count()
  if per_device > 0:
    return per_device * num, "config peak_flops_per_device"
  kind = jax.devices()[0].device_kind.lower()
  for prefix, peak in DATASHEET_PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return peak * num, f"datasheet bf16, {num} x {kind}"
  if jax.default_backend() == "cpu":
    cpu = measure_cpu_peak()
    return cpu.flops_per_s, cpu.describe()
  return measure_matmul_peak(4096) * num, f"matmul measured now, {num} x {kind}"


def mfu(tokens_per_second: float, flops_per_tok: float, peak_flops: float) -> float:
  return tokens_per_second * flops_per_tok / peak_flops
