"""CPU levers tried as prototypes, and the `--prototype` flag that picks one: patches of `llm_jax.model` that
`cpu_levers.py --prototype` applies while it traces side B only (and `profile_cpu_step.py --prototype` while it
traces every step), so each measurement stays reproducible without living in `llm_jax`.

- `dense_vjp`: every activation × weight einsum of the model whose weight dimensions are (inputs..., outputs...)
  gets a custom VJP that flattens both sides to matrices and writes the two gradients as plain 2-D dots,
  dx = dy · Wᵀ and dW = xᵀ · dy, instead of the einsum transposes autodiff derives.
- `mlp_vjp`: the same custom VJP on the MLP's projections only (fc and proj, or gate, up and down): in the 10m step
  their weight gradients are the dots XLA lays out worst (an Eigen dot whose gradient operand a copy transposes).
- `norm_dense`: each pre-norm and the projections that read it (q, k, v after the attention norm; fc, or gate and
  up, after the MLP norm) are one custom VJP: the backward recomputes the normalised rows once, takes every weight
  gradient from them as a 2-D dot, sums the input gradients of the projections and applies the closed-form norm
  backward, instead of the re-laid-out recomputations of the norm that autodiff and remat leave to XLA.

- `blas_dense`: `dense_vjp` with its three products (y = x · W, dx = dy · Wᵀ, dW = xᵀ · dy) sgemm calls into the
  OpenBLAS numpy ships, through an XLA FFI custom call (experiments/blas_ffi.py, built with g++ on first use): the
  transposes become BLAS flags instead of copies, and OpenBLAS's kernels replace XLA:CPU's for the projections. The
  custom calls are not dots to the remat policies, so under `remat_policy='dots'` their outputs are recomputed.

Batched-dot attention (commit a38f7fd) and causal query blocks (`causal_2`/`causal_4`, commit 86863c7) started here
too and are now `llm_jax.attention`'s: its layout on every backend, and two query blocks on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any
from typing import Iterator

import blas_ffi
import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags

from llm_jax import attention
from llm_jax import model as model_lib

Array = jax.Array


def _weight_split(spec: str) -> int | None:
  """How many leading dimensions of x are batch dimensions, for an `x, w -> y` einsum whose weight is
  (contracted..., output...) and whose x ends with the contracted dimensions; None for any other einsum."""
  inputs, _, out = spec.replace(" ", "").partition("->")
  parts = inputs.split(",")
  if len(parts) != 2:
    return None
  xs, ws = parts
  contracted = "".join(c for c in xs if c in ws and c not in out)
  keep = xs[:len(xs) - len(contracted)]
  if not contracted or not xs.endswith(contracted) or not ws.startswith(contracted):
    return None
  return len(keep) if out == keep + ws[len(contracted):] else None


def _xla_matmul(a: Array, b: Array, trans_a: bool = False, trans_b: bool = False) -> Array:
  return (a.T if trans_a else a) @ (b.T if trans_b else b)


def _dense_with(matmul: Any) -> Any:
  """A projection `dense(lead, x, w)` (x's first `lead` dimensions kept, the rest contracted with w's leading ones)
  whose custom VJP writes its three products as 2-D `matmul(a, b, trans_a, trans_b)` calls: y = x · W,
  dx = dy · Wᵀ and dW = xᵀ · dy, instead of the einsum transposes autodiff derives."""

  def flat(lead: int, x: Array, w: Array) -> tuple[Array, Array]:
    return x.reshape(math.prod(x.shape[:lead]), -1), w.reshape(math.prod(w.shape[:x.ndim - lead]), -1)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def dense(lead: int, x: Array, w: Array) -> Array:
    y2 = matmul(*flat(lead, x, w)).astype(jnp.result_type(x, w))
    return y2.reshape(x.shape[:lead] + w.shape[x.ndim - lead:])

  def fwd(lead: int, x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return dense(lead, x, w), (x, w)

  def bwd(lead: int, res: tuple[Array, Array], dy: Array) -> tuple[Array, Array]:
    x, w = res
    x2, w2 = flat(lead, x, w)
    dy2 = dy.reshape(x2.shape[0], -1)
    dx2, dw2 = matmul(dy2, w2, trans_b=True), matmul(x2, dy2, trans_a=True)
    return dx2.reshape(x.shape).astype(x.dtype), dw2.reshape(w.shape).astype(w.dtype)

  dense.defvjp(fwd, bwd)
  return dense


_dense = _dense_with(_xla_matmul)
# The same with each product an OpenBLAS sgemm (experiments/blas_ffi.py): the transposes are flags, not copies.
_blas_dense = _dense_with(blas_ffi.gemm)


class _JnpWithDenseVjp:
  """`jax.numpy` as the model sees it, except that projection einsums (those of `specs` only, if given) go through
  `dense` (`_dense`, or `_blas_dense`)."""

  def __init__(self, specs: tuple[str, ...] = (), dense: Any = _dense):
    self.specs = specs
    self.dense = dense

  def __getattr__(self, name: str) -> Any:
    return getattr(jnp, name)

  def einsum(self, spec: str, *operands: jax.Array, **kwargs: Any) -> jax.Array:
    lead = _weight_split(spec) if len(operands) == 2 and not kwargs else None
    if lead is None or (self.specs and spec not in self.specs):
      return jnp.einsum(spec, *operands, **kwargs)
    return self.dense(lead, *operands)


def _normalise(rms: bool, eps: float, x_NxD: Array, scale_D: Array,
               bias_D: Array | None) -> tuple[Array, Array, Array]:
  """The norm's output, the normalised rows before scale and shift, and their reciprocal standard deviation
  (N x 1), in float32."""
  if rms:
    rstd_Nx1 = jax.lax.rsqrt(jnp.mean(x_NxD * x_NxD, axis=-1, keepdims=True) + eps)
    xhat_NxD = x_NxD * rstd_Nx1
  else:
    centred_NxD = x_NxD - jnp.mean(x_NxD, axis=-1, keepdims=True)
    rstd_Nx1 = jax.lax.rsqrt(jnp.mean(centred_NxD * centred_NxD, axis=-1, keepdims=True) + eps)
    xhat_NxD = centred_NxD * rstd_Nx1
  h_NxD = xhat_NxD * scale_D if bias_D is None else xhat_NxD * scale_D + bias_D
  return h_NxD, xhat_NxD, rstd_Nx1


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _norm_dense(rms: bool, eps: float, x_NxD: Array, scale_D: Array, bias_D: Array | None,
                ws: tuple[Array, ...]) -> tuple[Array, ...]:
  """norm(x) · W for each W of `ws` (each D x M), the norm as `model.Norm` computes it (no bias when `rms`)."""
  h_NxD, _, _ = _normalise(rms, eps, x_NxD, scale_D, bias_D)
  return tuple(h_NxD @ w_DxM for w_DxM in ws)


def _norm_dense_fwd(rms, eps, x_NxD, scale_D, bias_D, ws):
  return _norm_dense(rms, eps, x_NxD, scale_D, bias_D, ws), (x_NxD, scale_D, bias_D, ws)


def _norm_dense_bwd(rms, eps, res, dys):
  x_NxD, scale_D, bias_D, ws = res
  h_NxD, xhat_NxD, rstd_Nx1 = _normalise(rms, eps, x_NxD, scale_D, bias_D)
  dws = tuple(h_NxD.T @ dy_NxM for dy_NxM in dys)
  dh_NxD = sum(dy_NxM @ w_DxM.T for dy_NxM, w_DxM in zip(dys, ws))
  dscale_D = jnp.sum(dh_NxD * xhat_NxD, axis=0)
  dbias_D = None if bias_D is None else jnp.sum(dh_NxD, axis=0)
  g_NxD = dh_NxD * scale_D
  proj_Nx1 = jnp.mean(g_NxD * xhat_NxD, axis=-1, keepdims=True)
  if rms:
    dx_NxD = rstd_Nx1 * (g_NxD - xhat_NxD * proj_Nx1)
  else:
    dx_NxD = rstd_Nx1 * (g_NxD - jnp.mean(g_NxD, axis=-1, keepdims=True) - xhat_NxD * proj_Nx1)
  return dx_NxD, dscale_D, dbias_D, dws


_norm_dense.defvjp(_norm_dense_fwd, _norm_dense_bwd)


class _Params(nn.Module):
  """Declares one of the model's submodules' parameters under its names and returns them (no arithmetic)."""

  specs: tuple[tuple[str, Any, tuple[int, ...], tuple[str, ...]], ...]

  @nn.compact
  def __call__(self) -> dict[str, Array]:
    return {name: model_lib.param_with_axes(self, name, init, shape, axes) for name, init, shape, axes in self.specs}


class _NormDenseBlock(nn.Module):
  """`model.Block` with the same parameters, each norm fused with the projections after it (`_norm_dense`);
  training shapes only (no KV cache, LoRA, QK-norm, dropout or a compute dtype other than float32)."""

  cfg: model_lib.ModelConfig
  deterministic: bool

  def _norm(self, name: str) -> tuple[Array, Array | None]:
    d, ones, zeros = self.cfg.d_model, nn.initializers.ones, nn.initializers.zeros
    specs = (("scale", ones, (d,), ("embed",)),) + (() if self.cfg.is_llama else (("bias", zeros, (d,), ("embed",)),))
    p = _Params(specs, name=name)()
    return p["scale"], p.get("bias")

  @nn.compact
  def __call__(self, x_BxLxD: Array, cache: model_lib.Cache | None, positions_BxL: Array,
               segment_ids_BxL: Array | None) -> tuple[Array, None]:
    cfg = self.cfg
    if cache is not None or cfg.lora_rank or cfg.qk_norm or cfg.dropout_rate or cfg.compute_dtype != "float32":
      raise ValueError("the norm_dense prototype covers float32 training without cache, LoRA, QK-norm or dropout")
    b, l, d = x_BxLxD.shape
    h, g, k, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
    gpt2, normal, zeros = not cfg.is_llama, model_lib.init_normal, nn.initializers.zeros
    out_init = normal(0.02 / (2 * cfg.num_layers) ** 0.5)
    attn_specs = [("query", normal(0.02), (d, h, k), ("embed", "heads", "head_dim")),
                  ("key", normal(0.02), (d, g, k), ("embed", "kv_heads", "head_dim")),
                  ("value", normal(0.02), (d, g, k), ("embed", "kv_heads", "head_dim")),
                  ("out", out_init, (h, k, d), ("heads", "head_dim", "embed"))]
    if gpt2:
      attn_specs += [(n + "_bias", zeros, (heads, k), (axis, "head_dim"))
                     for n, heads, axis in (("query", h, "heads"), ("key", g, "kv_heads"), ("value", g, "kv_heads"))]
      attn_specs.append(("out_bias", zeros, (d,), ("embed",)))
    scale_D, bias_D = self._norm("attn_norm")
    pa = _Params(tuple(attn_specs), name="attn")()
    x_NxD = x_BxLxD.reshape(b * l, d)
    qkv = _norm_dense(not gpt2, cfg.norm_eps, x_NxD, scale_D, bias_D,
                      tuple(pa[n].reshape(d, -1) for n in ("query", "key", "value")))
    q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = (y.reshape(b, l, -1, k) + (pa[n + "_bias"] if gpt2 else 0)
                                       for y, n in zip(qkv, ("query", "key", "value")))
    if cfg.is_llama:
      inv_freq_K2 = attention.rope_inverse_frequencies(cfg)
      q_BxLxHxK = attention.apply_rope(q_BxLxHxK, positions_BxL, inv_freq_K2)
      k_BxLxGxK = attention.apply_rope(k_BxLxGxK, positions_BxL, inv_freq_K2)
    pos_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    mask_BxLxS = attention.attention_mask(pos_BxL, pos_BxL, segment_ids_BxL, segment_ids_BxL)
    out_BxLxHxK = attention.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxLxS, cfg.attention_impl,
                                                  attention.causal_blocks(jax.default_backend()))
    y_BxLxD = jnp.einsum("BLHK,HKD->BLD", out_BxLxHxK, pa["out"])
    x_BxLxD = x_BxLxD + (y_BxLxD + pa["out_bias"] if gpt2 else y_BxLxD)

    scale_D, bias_D = self._norm("mlp_norm")
    names = ("gate", "up", "down") if cfg.is_llama else ("fc", "proj")
    mlp_specs = [(n, normal(0.02), (d, f), ("embed", "mlp")) for n in names[:-1]]
    mlp_specs.append((names[-1], out_init, (f, d), ("mlp", "embed")))
    if gpt2:
      mlp_specs += [("fc_bias", zeros, (f,), ("mlp",)), ("proj_bias", zeros, (d,), ("embed",))]
    pm = _Params(tuple(mlp_specs), name="mlp")()
    ins = _norm_dense(not gpt2, cfg.norm_eps, x_BxLxD.reshape(b * l, d), scale_D, bias_D,
                      tuple(pm[n] for n in names[:-1]))
    if cfg.is_llama:
      h_NxF = model_lib.activation(cfg, ins[0]) * ins[1]
    else:
      h_NxF = model_lib.activation(cfg, ins[0] + pm["fc_bias"])
    y_NxD = h_NxF @ pm[names[-1]]
    y_BxLxD = (y_NxD + pm["proj_bias"] if gpt2 else y_NxD).reshape(b, l, d)
    return model_lib.constrain(x_BxLxD + y_BxLxD, ("batch", "length", "act_embed")), None


# Each prototype: the `llm_jax.model` global it replaces and what replaces it.
PATCHES = {"dense_vjp": ("jnp", _JnpWithDenseVjp()),
           "mlp_vjp": ("jnp", _JnpWithDenseVjp(("BLD,DF->BLF", "BLF,FD->BLD"))),
           "norm_dense": ("Block", _NormDenseBlock),
           "blas_dense": ("jnp", _JnpWithDenseVjp(dense=_blas_dense))}
PROTOTYPES = tuple(PATCHES)
# Defined here, once, for cpu_levers.py and profile_cpu_step.py: both can then be imported into one process.
PROTOTYPE = flags.DEFINE_enum("prototype", "", ["", *PROTOTYPES], "A prototype of experiments/cpu_prototypes.py "
                              "patched into the trace: of side B in cpu_levers.py --mode=model, of every step "
                              "profile_cpu_step.py profiles.")


@contextlib.contextmanager
def patched(name: str) -> Iterator[None]:
  """Applies prototype `name` ('' for none) to `llm_jax.model` for the duration of the block (a trace)."""
  if name and name not in PROTOTYPES:
    raise ValueError(f"--prototype={name!r} is unknown; choose from {', '.join(PROTOTYPES)} (or '' for none)")
  if not name:
    yield
    return
  attr, value = PATCHES[name]
  saved = getattr(model_lib, attr)
  setattr(model_lib, attr, value)
  # JAX caches the traces of scan and remat bodies by function, which a patched global does not change: without
  # clearing them the patched model would reuse the unpatched trace (and the next trace the patched one).
  jax.clear_caches()
  try:
    yield
  finally:
    setattr(model_lib, attr, saved)
    jax.clear_caches()
