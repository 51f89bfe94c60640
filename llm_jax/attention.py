"""Attention arithmetic the model composes: RoPE frequencies and rotation, the causal and document mask, and
softmax(QKᵀ/√K)V over grouped key/value heads, computed in causal query blocks where that is faster (shape legend
in `llm_jax.model`).

This is XLA's attention. Training and scoring may run a fused kernel instead (`llm_jax.attention_kernels`: splash on
TPU, cuDNN on GPU); decoding always runs this one over the KV cache: one or a few queries against the cache need no
flash kernel, and the cache's slots past the current position are masked by position, not by a causal block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
  from llm_jax.model_config import ModelConfig

Array = jax.Array

# Query blocks of the attention without a KV cache, per backend, from BENCHMARKS.md ("A second machine kind"): on
# XLA:CPU two blocks, each scored against the keys up to its own end, skip the all-masked quarter of the scores and
# made the 10m train step 1.08x faster over 7 block pairs (sotu_small 1.05x, tiny within the noise; four blocks 0.99x
# at 10m and 0.93x at tiny). Other backends are unmeasured and keep one block.
CAUSAL_BLOCKS = {"cpu": 2}


def rope_inverse_frequencies(cfg: ModelConfig) -> Array:
  """Per-pair rotation frequencies, with Llama-3 long-context scaling when configured."""
  k = cfg.head_dim
  inv_freq_K2 = 1.0 / (cfg.rope_theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
  if cfg.rope_scaling_factor <= 0:
    return inv_freq_K2
  wavelen = 2 * jnp.pi / inv_freq_K2
  low_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor
  high_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor
  smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
      cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
  smoothed = (1 - smooth) * inv_freq_K2 / cfg.rope_scaling_factor + smooth * inv_freq_K2
  scaled = jnp.where(wavelen > low_wavelen, inv_freq_K2 / cfg.rope_scaling_factor, inv_freq_K2)
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x_BxLxHxK: Array, positions_BxL: Array, inv_freq_K2: Array) -> Array:
  """Rotates the two halves of each head (the Hugging Face 'rotate_half' layout)."""
  angles_BxLxK2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_K2
  cos = jnp.cos(angles_BxLxK2)[:, :, None, :]
  sin = jnp.sin(angles_BxLxK2)[:, :, None, :]
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


def attention_mask(q_pos_BxL: Array, k_pos_BxS: Array, q_seg_BxL: Array | None,
                   k_seg_BxS: Array | None) -> Array:
  """Causal by slot index, and never across segments (packed documents)."""
  mask_BxLxS = k_pos_BxS[:, None, :] <= q_pos_BxL[:, :, None]
  if q_seg_BxL is not None:
    mask_BxLxS &= q_seg_BxL[:, :, None] == k_seg_BxS[:, None, :]
  return mask_BxLxS


def causal_blocks(backend: str) -> int:
  """How many causal query blocks the training attention uses on `backend` ('cpu', 'gpu', 'tpu')."""
  return CAUSAL_BLOCKS.get(backend, 1)


def effective_blocks(requested: int, query_len: int, key_len: int) -> int:
  """The query blocks the einsum attention runs in: `requested` when the scores are square (queries and keys over
  the same slots) and it divides their length, else one."""
  return requested if requested > 1 and query_len == key_len and query_len % requested == 0 else 1


def query_blocks(impl: str, backend: str, length: int) -> int:
  """The causal query blocks a training step's attention runs in on `backend`: the einsum path's `effective_blocks`
  of the backend's count, one for the 'jax' path, none (0) for a fused kernel."""
  if impl not in ("einsum", "jax"):
    return 0
  return effective_blocks(causal_blocks(backend), length, length) if impl == "einsum" else 1


def dot_product_attention(q_BxLxHxK: Array, k_BxSxGxK: Array, v_BxSxGxK: Array, mask_BxLxS: Array,
                          impl: str = "einsum", blocks: int = 1, return_probs: bool = False
                          ) -> Array | tuple[Array, Array]:
  """softmax(QKᵀ/√K)V with grouped key/value heads; softmax in float32.

  With `return_probs` (inspection: the einsum path in one block), also the softmax probabilities, B x H x L x S.

  `blocks` > 1 is for a mask that is causal by slot over the same L slots of queries and keys (training, and
  scoring without a cache): the queries are split into that many blocks and each is scored against the keys up to
  its own end only, so the blocks above the diagonal, all masked, are never computed. Each block's softmax still
  covers every key its queries may see, so the result is the same up to summation order. A length the count does
  not divide, or the 'jax' impl, runs as one block.
  """
  if return_probs and (impl != "einsum" or blocks != 1):
    raise ValueError(f"attention probabilities come from the einsum path in one block, not impl={impl!r} with "
                     f"{blocks} blocks")
  if impl == "jax":  # implementation=None: XLA's attention in jax 0.10.2, not cuDNN's
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK,
                                        mask=mask_BxLxS[:, None, :, :])
  b, l, h, k = q_BxLxHxK.shape
  s, g = k_BxSxGxK.shape[1:3]
  n = effective_blocks(blocks, l, s)
  # Batch dimensions (B, G) leading and contractions trailing in both dots, transposed once here: XLA:CPU then
  # needs no re-layout copies around them (train step 1.04x at the tiny shape, 1.11x at 10m; BENCHMARKS.md).
  q_BxGxRxLxK = q_BxLxHxK.reshape(b, l, g, h // g, k).transpose(0, 2, 3, 1, 4)
  k_BxGxSxK = k_BxSxGxK.transpose(0, 2, 1, 3)
  v_BxGxSxK = v_BxSxGxK.transpose(0, 2, 1, 3)
  c = l // n
  outs = []
  for i in range(n):
    start, end = i * c, (i + 1) * c if n > 1 else s
    logits_BxGxRxLxS = jnp.einsum("BGRLK,BGSK->BGRLS", q_BxGxRxLxK[:, :, :, start:start + c], k_BxGxSxK[:, :, :end],
                                  preferred_element_type=jnp.float32) / jnp.sqrt(k).astype(jnp.float32)
    logits_BxGxRxLxS = jnp.where(mask_BxLxS[:, None, None, start:start + c, :end], logits_BxGxRxLxS,
                                 jnp.finfo(jnp.float32).min)
    probs_BxGxRxLxS = jax.nn.softmax(logits_BxGxRxLxS, axis=-1)
    outs.append(jnp.einsum("BGRLS,BGSK->BGRLK", probs_BxGxRxLxS.astype(v_BxSxGxK.dtype), v_BxGxSxK[:, :, :end]))
  out_BxGxRxLxK = outs[0] if n == 1 else jnp.concatenate(outs, axis=3)
  out_BxLxHxK = out_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(b, l, h, k)
  return (out_BxLxHxK, probs_BxGxRxLxS.reshape(b, h, l, s)) if return_probs else out_BxLxHxK
