"""Metrics: masked cross-entropy and accuracy, perplexity, model FLOPs per token, MFU and the peak it divides by.

All are pure functions except the peak, which on devices without a datasheet figure is measured by timing a matmul.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.model import ModelConfig
from llm_jax.model import count_non_embedding_params

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
  """Achieved float32 FLOP/s of an n³ matmul on the first device: the CPU 'peak' for MFU."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  a, b = jax.device_put(a, jax.devices()[0]), jax.device_put(b, jax.devices()[0])
  return 2 * n**3 / median_seconds(jax.jit(lambda x, y: x @ y), a, b, repeats=repeats)


def peak_flops_total(per_device: float = 0.0) -> tuple[float, str]:
  """The peak FLOP/s of all devices together, used for MFU, and where the figure came from.

  On CPU the simulated devices share the host's cores, so the peak is one float32 matmul
  measured now on the whole host, whatever the device count.
  """
  num = jax.device_count()
  if per_device > 0:
    return per_device * num, "config"
  kind = jax.devices()[0].device_kind.lower()
  for prefix, peak in DATASHEET_PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return peak * num, f"datasheet bf16, {num} x {kind}"
  if jax.default_backend() == "cpu":
    return measure_matmul_peak(), "float32 matmul measured now"
  return measure_matmul_peak(4096) * num, f"matmul measured now, {num} x {kind}"


def mfu(tokens_per_second: float, flops_per_tok: float, peak_flops: float) -> float:
  return tokens_per_second * flops_per_tok / peak_flops
