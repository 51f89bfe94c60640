"""The fused attention kernels that training and scoring run instead of XLA's attention: splash attention (a Pallas
kernel) on TPU and cuDNN's flash kernel on GPU, what attention_impl 'auto' means per backend, the splash block rule,
and the start-up check that refuses a shape or dtype a kernel cannot take (shape legend in `llm_jax.model`).

Both kernels are causal by slot and keep packed documents apart by segment id, as `attention.attention_mask` does.
They run inside `jax.shard_map` with the batch over the mesh axes of the logical 'batch' axis (data, fsdp) and the
heads over those of 'act_heads' (tensor): Mosaic (TPU) kernels cannot be partitioned automatically.

What cuDNN takes in jax 0.10.2 (read in `jax/_src/nn/functions.py` and `jax/_src/cudnn/fused_attention_stablehlo.py`):
`jax.nn.dot_product_attention(implementation='cudnn')` takes `is_causal`, one query and one key length per row
(padding) and a dense boolean `mask`, which it turns into an additive B×1×L×S bias for the fused kernel. Several
documents per row (`q_offsets`/`kv_offsets`, cuDNN's packed layout) exist only in the private
`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`, and only on Hopper or later. So packed rows reach
cuDNN here as `is_causal` plus the same-document mask as that bias: fused and not materialising the B×H×L×S scores,
but the bias (and the bias gradient cuDNN always returns) is still B×1×L×L per layer. A Pallas GPU flash kernel with
segment ids (`jax.experimental.pallas.ops.gpu.attention.mha`) would avoid that, at the cost of repeating KV heads for
grouped-query attention; it is not used here. No GPU was available to run either (BENCHMARKS.md, GPU section).
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from llm_jax import errors
from llm_jax import target

Array = jax.Array

FUSED_IMPLS = ("splash", "cudnn")
# What attention_impl 'auto' runs per backend; a backend it does not name runs the einsum (XLA) attention.
AUTO_ATTENTION = {"tpu": "splash", "gpu": "cudnn"}
# Splash blocks (query and key, forward and both backward kernels): the sequence rounded up to the TPU lane width
# (128) up to SPLASH_MAX_BLOCK, then SPLASH_MAX_BLOCK. 512 is what MaxText's splash defaults use for long contexts;
# at 512×512 a block's float32 scores are 1 MiB, well inside a v5e core's VMEM. Not tuned on TPU hardware here.
SPLASH_LANES = 128
SPLASH_MAX_BLOCK = 512
# cuDNN's flash kernel in jax 0.10.2 (`check_is_flash_attention`): bf16/fp16 inputs, head dim a multiple of 8 and at
# most 256 on Hopper or later (compute capability 9.0), 128 before; with a bias (our document mask) in training, even
# sequence lengths.
CUDNN_DTYPES = ("bfloat16", "float16")


def resolve_attention_impl(impl: str, backend: str) -> str:
  """The attention that runs: an explicit impl as given, 'auto' as AUTO_ATTENTION says for `backend`."""
  return AUTO_ATTENTION.get(backend, "einsum") if impl == "auto" else impl


def splash_block(length: int) -> int:
  """The splash block size for sequences of `length` (see SPLASH_MAX_BLOCK)."""
  return min(SPLASH_MAX_BLOCK, SPLASH_LANES * math.ceil(length / SPLASH_LANES))


def check_attention_impl(impl: str, backend: str, *, compute_dtype: str, head_dim: int, seq_len: int,
                         gpu_capability: str = "9.0") -> None:
  """Raises ValueError (one line, naming the key and the fix) when the resolved `impl` cannot run on `backend` with
  these shapes; `gpu_capability` is the CUDA compute capability ('8.0', '9.0') for cuDNN's head-dim limit."""
  resolved = resolve_attention_impl(impl, backend)
  key = f"model.attention_impl={impl!r}" + (f" (on {backend}: {resolved!r})" if impl == "auto" else "")
  fix = "or pass --config.model.attention_impl=einsum"
  if resolved == "splash" and backend == "gpu":
    raise errors.ConfigError(f"{key}: splash attention is a TPU kernel (interpreted on CPU) and does not run on GPU; "
                             "pass --config.model.attention_impl=cudnn or einsum")
  if resolved != "cudnn":
    return
  if backend != "gpu":
    raise errors.ConfigError(f"{key}: cuDNN's kernel runs on GPU only and this backend is {backend}; pass "
                             "--config.model.attention_impl=auto (splash on TPU, einsum on CPU) or einsum")
  if compute_dtype not in CUDNN_DTYPES:
    raise errors.ConfigError(f"{key} needs model.compute_dtype bfloat16 or float16, got {compute_dtype}; pass "
                             f"--config.model.compute_dtype=bfloat16 {fix}")
  max_head_dim = 256 if float(gpu_capability) >= 9.0 else 128
  if head_dim % 8 or head_dim > max_head_dim:
    raise errors.ConfigError(f"{key} needs a head dim that is a multiple of 8 and at most {max_head_dim} on compute "
                             f"capability {gpu_capability}, got model.head_dim={head_dim}; change model.head_dim {fix}")
  if seq_len % 2:
    raise errors.ConfigError(f"{key} needs an even data.seq_len with the document mask, got {seq_len}; change "
                             f"data.seq_len {fix}")


def _pad_length(x: Array, pad: int, value: int = 0) -> Array:
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def splash_attention(q_BxLxHxK: Array, k_BxLxGxK: Array, v_BxLxGxK: Array, segment_ids_BxL: Array | None, *,
                     block: int | None = None, interpret: bool | None = None) -> Array:
  """Causal softmax(QKᵀ/√K)V over grouped KV heads, never across segments, by the splash kernel on one shard.

  A length the block does not divide is padded at the end (zeros, and a segment id no document has): causal
  masking already hides the padded keys from every real query, and the padded queries' rows are cut off.
  `block` defaults to `splash_block(L)`; `interpret` (run the kernel as plain JAX, for CPU) to any target platform
  but TPU.
  """
  b, l, h, k = q_BxLxHxK.shape
  block = block or splash_block(l)
  interpret = target.platform() != "tpu" if interpret is None else interpret
  pad = -l % block
  length = l + pad
  blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                             block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * h)
  kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
  # The kernel takes queries unscaled; scaling them first is softmax(QKᵀ/√K) up to the rounding of q·(1/√K).
  q_BxHxLxK = _pad_length(q_BxLxHxK * jnp.asarray(1 / math.sqrt(k), q_BxLxHxK.dtype), pad).transpose(0, 2, 1, 3)
  k_BxGxLxK = _pad_length(k_BxLxGxK, pad).transpose(0, 2, 1, 3)
  v_BxGxLxK = _pad_length(v_BxLxGxK, pad).transpose(0, 2, 1, 3)
  if segment_ids_BxL is None:
    out_BxHxLxK = jax.vmap(kernel)(q_BxHxLxK, k_BxGxLxK, v_BxGxLxK)
  else:
    seg_BxL = _pad_length(segment_ids_BxL, pad, value=-1)  # document ids are >= 0 (0: padding within the row)
    out_BxHxLxK = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
        q_BxHxLxK, k_BxGxLxK, v_BxGxLxK, seg_BxL)
  return out_BxHxLxK.transpose(0, 2, 1, 3)[:, :l]


def cudnn_attention(q_BxLxHxK: Array, k_BxLxGxK: Array, v_BxLxGxK: Array, segment_ids_BxL: Array | None) -> Array:
  """Causal attention by cuDNN's fused kernel; packed documents through its bias (module docstring)."""
  mask_Bx1xLxL = None
  if segment_ids_BxL is not None:
    mask_Bx1xLxL = segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :]
  return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=mask_Bx1xLxL, is_causal=True,
                                      implementation="cudnn")


def _spec(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: jax.sharding.AbstractMesh) -> P:
  """The mesh axes of `logical` under the active rules, keeping only those whose sizes divide their dimension (a
  scoring batch of one row stays whole)."""
  axes = []
  for dim, entry in zip(shape, nn.logical_to_mesh_axes(logical)):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    axes.append(entry if names and dim % math.prod(mesh.shape[n] for n in names) == 0 else None)
  return P(*axes)


def fused_attention(impl: str, q_BxLxHxK: Array, k_BxLxGxK: Array, v_BxLxGxK: Array,
                    segment_ids_BxL: Array | None) -> Array:
  """Self-attention over the same L slots by `impl` ('splash' or 'cudnn'), under `jax.shard_map` on the active mesh
  (batch over the 'batch' rule's axes, heads over 'act_heads''s); without a mesh, on the one device."""
  kernel: Callable[..., Array] = {"splash": splash_attention, "cudnn": cudnn_attention}[impl]
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
  heads = ("batch", "length", "act_heads", "head_dim")
  q_spec = _spec(heads, q_BxLxHxK.shape, mesh)
  kv_spec = _spec(heads, k_BxLxGxK.shape, mesh)
  if q_spec[2] != kv_spec[2]:  # each shard must hold whole groups: query heads and their KV heads split alike
    q_spec, kv_spec = P(*q_spec[:2], None, None), P(*kv_spec[:2], None, None)
  seg_spec = P(q_spec[0], None)
  if segment_ids_BxL is None:
    body = jax.shard_map(lambda q, k, v: kernel(q, k, v, None), mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec),
                         out_specs=q_spec, check_vma=False)
    return body(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)
  body = jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                       check_vma=False)
  return body(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
