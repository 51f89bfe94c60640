"""The decoder-only Transformer (GPT-2 and Llama families) in Flax Linen, speaking only logical axis names.

Dimension legend for shape-suffixed names (written once, here):
  B batch, L query length, S key length (or KV-cache length), D model width, H query heads,
  G key/value heads (grouped-query attention; H = G * R), R query heads per KV head, K head dim,
  F MLP hidden width, V vocabulary, N layers.

Parameter logical axes: 'vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'layers',
'positions'. Activation logical axes: 'batch', 'length', 'act_embed', 'act_heads', 'act_mlp',
'act_vocab'. `llm_jax.sharding` maps these names onto mesh axes; the model knows nothing of meshes.

We use Linen (not NNX) on purpose: parameters are a plain pytree, so the train step, orbax,
optax and weight conversion all see one functional structure, and `nn.scan` over layers with
per-layer KV caches is a single, well-trodden transform.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax import lora
from llm_jax import target
from llm_jax.attention import apply_rope
from llm_jax.attention import attention_mask
from llm_jax.attention import causal_blocks
from llm_jax.attention import dot_product_attention
from llm_jax.attention import rope_inverse_frequencies
from llm_jax.attention_kernels import FUSED_IMPLS
from llm_jax.attention_kernels import fused_attention
from llm_jax.attention_kernels import resolve_attention_impl
from llm_jax.model_config import ModelConfig

Array = jax.Array
Cache = dict[str, Array]

# What remat_policy 'auto' means per backend, from BENCHMARKS.md ("What limits the CPU figures"): on XLA:CPU
# recomputing the dots is faster than saving activations (fwd+bwd tiny 48 vs 69 ms, 10m 10.2 vs 12.9 s), because
# saved activations are re-laid-out by copy kernels for the weight gradients. Other backends are unmeasured here and
# save every activation ('none'), which needs no recomputation when memory allows.
AUTO_REMAT = {"cpu": "dots"}


def init_normal(stddev: float) -> nn.initializers.Initializer:
  return nn.initializers.normal(stddev=stddev)


def param_with_axes(module: nn.Module, name: str, init: Any, shape: tuple[int, ...],
                    axes: tuple[str | None, ...]) -> Array:
  """Declares a float32 parameter annotated with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
  return nn.with_logical_constraint(x, axes)


def lookup(table_VxD: Array, ids_BxL: Array, rows_axis: str) -> Array:
  """Embedding gather from a table whose width is not fsdp-sharded, so no resharding is needed."""
  return jnp.take(constrain(table_VxD, (rows_axis, "act_embed")), ids_BxL, axis=0)


class Norm(nn.Module):
  """LayerNorm (GPT-2, with bias) or RMSNorm (Llama), computed in float32."""

  rms: bool
  eps: float
  axis: str = "embed"  # the logical name of the normalised (last) dimension

  @nn.compact
  def __call__(self, x_BxLxD: Array) -> Array:
    d = x_BxLxD.shape[-1]
    x = x_BxLxD.astype(jnp.float32)
    scale_D = param_with_axes(self, "scale", nn.initializers.ones, (d,), (self.axis,))
    if self.rms:
      y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale_D
    else:
      bias_D = param_with_axes(self, "bias", nn.initializers.zeros, (d,), (self.axis,))
      mean = jnp.mean(x, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
      y = (x - mean) * jax.lax.rsqrt(var + self.eps) * scale_D + bias_D
    return y.astype(x_BxLxD.dtype)


class Attention(nn.Module):
  """Causal self-attention with grouped-query heads, optional RoPE and an optional KV cache."""

  cfg: ModelConfig

  def _proj(self, name: str, x_BxLxD: Array, heads: int, axis: str) -> Array:
    cfg = self.cfg
    w_DxHxK = param_with_axes(self, name, init_normal(0.02), (cfg.d_model, heads, cfg.head_dim),
                              ("embed", axis, "head_dim"))
    y = lora.adapt(cfg, self, name, jnp.einsum("BLD,DHK->BLHK", x_BxLxD, w_DxHxK.astype(cfg.dtype)), x_BxLxD,
                   ("D", "HK"), ((cfg.d_model,), (heads, cfg.head_dim)), (("embed",), (axis, "head_dim")))
    if not cfg.is_llama:
      b_HxK = param_with_axes(self, name + "_bias", nn.initializers.zeros, (heads, cfg.head_dim),
                              (axis, "head_dim"))
      y = y + b_HxK.astype(cfg.dtype)
    return y

  @nn.compact
  def __call__(self, x_BxLxD: Array, positions_BxL: Array, segment_ids_BxL: Array | None,
               cache: Cache | None) -> tuple[Array, Cache | None]:
    cfg = self.cfg
    q_BxLxHxK = constrain(self._proj("query", x_BxLxD, cfg.num_heads, "heads"),
                          ("batch", "length", "act_heads", "head_dim"))
    k_BxLxGxK = self._proj("key", x_BxLxD, cfg.num_kv_heads, "kv_heads")
    v_BxLxGxK = self._proj("value", x_BxLxD, cfg.num_kv_heads, "kv_heads")
    if cfg.qk_norm:
      q_BxLxHxK = Norm(True, cfg.norm_eps, "head_dim", name="query_norm")(q_BxLxHxK)
      k_BxLxGxK = Norm(True, cfg.norm_eps, "head_dim", name="key_norm")(k_BxLxGxK)
    if cfg.is_llama:
      inv_freq_K2 = rope_inverse_frequencies(cfg)
      q_BxLxHxK = apply_rope(q_BxLxHxK, positions_BxL, inv_freq_K2)
      k_BxLxGxK = apply_rope(k_BxLxGxK, positions_BxL, inv_freq_K2)

    b, l = x_BxLxD.shape[:2]
    if cache is None:
      # Causal by slot, not by position: positions restart inside packed rows.
      q_pos_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
      k_BxSxGxK, v_BxSxGxK = k_BxLxGxK, v_BxLxGxK
      k_pos_BxS = q_pos_BxL
      q_seg_BxL = k_seg_BxS = segment_ids_BxL
    else:
      # Decoding: all rows share one start position, so one dynamic slice writes the new keys.
      start = positions_BxL[0, 0]
      k_BxSxGxK = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_BxLxGxK.astype(cache["k"].dtype),
                                                      start, axis=1)
      v_BxSxGxK = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_BxLxGxK.astype(cache["v"].dtype),
                                                      start, axis=1)
      cache = {"k": k_BxSxGxK, "v": v_BxSxGxK}
      s = k_BxSxGxK.shape[1]
      k_pos_BxS = jnp.broadcast_to(jnp.arange(s, dtype=positions_BxL.dtype), (x_BxLxD.shape[0], s))
      q_seg_BxL = k_seg_BxS = None  # one sequence per row while decoding
      q_pos_BxL = start + jnp.broadcast_to(jnp.arange(l, dtype=positions_BxL.dtype), (b, l))

    impl = resolve_attention_impl(cfg.attention_impl, target.platform())
    if self.is_mutable_collection("intermediates"):  # inspection (llm_jax.interp) keeps the probabilities
      mask_BxLxS = attention_mask(q_pos_BxL, k_pos_BxS, q_seg_BxL, k_seg_BxS)
      out_BxLxHxK, probs_BxHxLxS = dot_product_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxLxS, "einsum", 1,
                                                         return_probs=True)
      self.sow("intermediates", "probs", probs_BxHxLxS)
    elif cache is None and impl in FUSED_IMPLS:
      out_BxLxHxK = fused_attention(impl, q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxL)
    else:  # decoding keeps XLA's attention over the cache, whatever the impl (llm_jax.attention)
      mask_BxLxS = attention_mask(q_pos_BxL, k_pos_BxS, q_seg_BxL, k_seg_BxS)
      # Without a cache the mask is causal by slot over the same slots, which query blocks may skip above.
      blocks = causal_blocks(target.platform()) if cache is None else 1
      out_BxLxHxK = dot_product_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxLxS,
                                          "jax" if impl == "jax" else "einsum", blocks)
    w_HxKxD = param_with_axes(self, "out", init_normal(0.02 / (2 * cfg.num_layers) ** 0.5),
                              (cfg.num_heads, cfg.head_dim, cfg.d_model), ("heads", "head_dim", "embed"))
    y_BxLxD = lora.adapt(cfg, self, "out", jnp.einsum("BLHK,HKD->BLD", out_BxLxHxK, w_HxKxD.astype(cfg.dtype)),
                         out_BxLxHxK, ("HK", "D"), ((cfg.num_heads, cfg.head_dim), (cfg.d_model,)),
                         (("heads", "head_dim"), ("embed",)))
    if not cfg.is_llama:
      y_BxLxD += param_with_axes(self, "out_bias", nn.initializers.zeros, (cfg.d_model,),
                                 ("embed",)).astype(cfg.dtype)
    return y_BxLxD, cache


def activation(cfg: ModelConfig, h: Array) -> Array:
  """The MLP's nonlinearity: the family's own (GELU, or SiLU in SwiGLU's gate) or relu(h)²."""
  relu2 = cfg.mlp_activation == "relu2"
  return jnp.square(jax.nn.relu(h)) if relu2 else jax.nn.silu(h) if cfg.is_llama else jax.nn.gelu(h, approximate=True)


class Mlp(nn.Module):
  """GELU MLP with biases (GPT-2) or SwiGLU without biases (Llama); `mlp_activation` swaps the nonlinearity."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: Array) -> Array:
    cfg, dt = self.cfg, self.cfg.dtype
    d, f = cfg.d_model, cfg.d_ff
    out_init = init_normal(0.02 / (2 * cfg.num_layers) ** 0.5)
    in_spec = (("D", "F"), ((d,), (f,)), (("embed",), ("mlp",)))
    out_spec = (("F", "D"), ((f,), (d,)), (("mlp",), ("embed",)))
    if cfg.is_llama:
      gate_DxF = param_with_axes(self, "gate", init_normal(0.02), (d, f), ("embed", "mlp"))
      up_DxF = param_with_axes(self, "up", init_normal(0.02), (d, f), ("embed", "mlp"))
      gate_BxLxF = lora.adapt(cfg, self, "gate", jnp.einsum("BLD,DF->BLF", x_BxLxD, gate_DxF.astype(dt)), x_BxLxD,
                              *in_spec)
      up_BxLxF = lora.adapt(cfg, self, "up", jnp.einsum("BLD,DF->BLF", x_BxLxD, up_DxF.astype(dt)), x_BxLxD, *in_spec)
      h_BxLxF = activation(cfg, gate_BxLxF) * up_BxLxF
      h_BxLxF = constrain(h_BxLxF, ("batch", "length", "act_mlp"))
      down_FxD = param_with_axes(self, "down", out_init, (f, d), ("mlp", "embed"))
      return lora.adapt(cfg, self, "down", jnp.einsum("BLF,FD->BLD", h_BxLxF, down_FxD.astype(dt)), h_BxLxF, *out_spec)
    fc_DxF = param_with_axes(self, "fc", init_normal(0.02), (d, f), ("embed", "mlp"))
    fc_bias_F = param_with_axes(self, "fc_bias", nn.initializers.zeros, (f,), ("mlp",))
    h_BxLxF = lora.adapt(cfg, self, "fc", jnp.einsum("BLD,DF->BLF", x_BxLxD, fc_DxF.astype(dt)), x_BxLxD,
                         *in_spec) + fc_bias_F.astype(dt)
    h_BxLxF = constrain(activation(cfg, h_BxLxF), ("batch", "length", "act_mlp"))
    proj_FxD = param_with_axes(self, "proj", out_init, (f, d), ("mlp", "embed"))
    proj_bias_D = param_with_axes(self, "proj_bias", nn.initializers.zeros, (d,), ("embed",))
    return lora.adapt(cfg, self, "proj", jnp.einsum("BLF,FD->BLD", h_BxLxF, proj_FxD.astype(dt)), h_BxLxF,
                      *out_spec) + proj_bias_D.astype(dt)


class Block(nn.Module):
  """One pre-norm residual block; its signature fits `nn.scan` (carry, per-layer cache)."""

  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxLxD: Array, cache: Cache | None, positions_BxL: Array,
               segment_ids_BxL: Array | None) -> tuple[Array, Cache | None]:
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
    h_BxLxD = Norm(cfg.is_llama, cfg.norm_eps, name="attn_norm")(x_BxLxD)
    h_BxLxD, cache = Attention(cfg, name="attn")(
        h_BxLxD, positions_BxL, segment_ids_BxL, cache)
    x_BxLxD = x_BxLxD + drop(h_BxLxD)
    h_BxLxD = Mlp(cfg, name="mlp")(Norm(cfg.is_llama, cfg.norm_eps, name="mlp_norm")(x_BxLxD))
    x_BxLxD = constrain(x_BxLxD + drop(h_BxLxD), ("batch", "length", "act_embed"))
    self.sow("intermediates", "residual", x_BxLxD)  # a no-op unless the caller made 'intermediates' mutable
    return x_BxLxD, cache


def resolve_remat_policy(policy: str, backend: str) -> str:
  """The remat policy that runs: an explicit one as given, 'auto' as AUTO_REMAT says for `backend` ('cpu', 'gpu',
  'tpu')."""
  return AUTO_REMAT.get(backend, "none") if policy == "auto" else policy


def _remat_policy(name: str) -> Any:
  return {
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
      "dots_saveable": jax.checkpoint_policies.dots_saveable,
  }[name]


class Transformer(nn.Module):
  """Token ids in, next-token logits out; with `cache`, also the updated KV cache."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL: Array, positions_BxL: Array | None = None,
               segment_ids_BxL: Array | None = None, cache: Cache | None = None,
               deterministic: bool = True) -> tuple[Array, Cache | None]:
    cfg = self.cfg
    b, l = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    embed_VxD = param_with_axes(self, "embed", init_normal(0.02), (cfg.vocab_size, cfg.d_model),
                                ("vocab", "embed"))
    x_BxLxD = lookup(embed_VxD, tokens_BxL, "vocab").astype(cfg.dtype)
    if not cfg.is_llama:
      pos_embed_LxD = param_with_axes(self, "pos_embed", init_normal(0.01), (cfg.max_len, cfg.d_model),
                                      ("positions", "embed"))
      x_BxLxD += lookup(pos_embed_LxD, positions_BxL, "positions").astype(cfg.dtype)
    x_BxLxD = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x_BxLxD)
    x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))
    self.sow("intermediates", "embedded", x_BxLxD)

    block = Block
    # Resolved here, at trace time, so a config (and the checkpoint recording it) keeps 'auto' and a run resumed on
    # another platform takes that platform's choice.
    remat = resolve_remat_policy(cfg.remat_policy, target.platform())
    if remat != "none":
      block = nn.remat(Block, policy=_remat_policy(remat), prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxLxD, cache = stack(cfg, deterministic, name="layers")(x_BxLxD, cache, positions_BxL,
                                                               segment_ids_BxL)
    else:
      new_layers = []
      for i in range(cfg.num_layers):
        layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
        x_BxLxD, layer_cache = block(cfg, deterministic, name=f"layers_{i}")(
            x_BxLxD, layer_cache, positions_BxL, segment_ids_BxL)
        new_layers.append(layer_cache)
      if cache is not None:
        cache = jax.tree.map(lambda *c: jnp.stack(c), *new_layers)

    x_BxLxD = Norm(cfg.is_llama, cfg.norm_eps, name="final_norm")(x_BxLxD)
    head_DxV = None if cfg.tie_embeddings else param_with_axes(
        self, "lm_head", init_normal(0.02), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
    return output_logits(cfg, x_BxLxD, embed_VxD, head_DxV), cache


def output_logits(cfg: ModelConfig, x_BxLxD: Array, embed_VxD: Array, head_DxV: Array | None) -> Array:
  """Float32 logits of the final-normed residual stream: the tied embedding (head None) or the output head, and the
  soft cap when configured."""
  if head_DxV is None:
    logits_BxLxV = jnp.einsum("BLD,VD->BLV", x_BxLxD, embed_VxD.astype(cfg.dtype))
  else:
    logits_BxLxV = jnp.einsum("BLD,DV->BLV", x_BxLxD, head_DxV.astype(cfg.dtype))
  logits_BxLxV = constrain(logits_BxLxV, ("batch", "length", "act_vocab")).astype(jnp.float32)
  if cfg.logit_softcap > 0:
    logits_BxLxV = cfg.logit_softcap * jnp.tanh(logits_BxLxV / cfg.logit_softcap)
  return logits_BxLxV


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> Cache:
  """An empty KV cache, layer axis first (what `nn.scan` consumes)."""
  shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def count_non_embedding_params(cfg: ModelConfig) -> int:
  """Parameters outside the token and position embeddings (and an untied head), by formula."""
  d, f, k = cfg.d_model, cfg.d_ff, cfg.head_dim
  attn = d * k * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
  if cfg.is_llama:
    per_layer = attn + 3 * d * f + 2 * d
  else:
    per_layer = attn + 2 * d * f + k * (cfg.num_heads + 2 * cfg.num_kv_heads) + d + f + d + 4 * d
  final_norm = d if cfg.is_llama else 2 * d
  return cfg.num_layers * (per_layer + (2 * k if cfg.qk_norm else 0)) + final_norm


@functools.cache
def _abstract_init(cfg: ModelConfig) -> Any:
  model = Transformer(cfg)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)


def abstract_params(cfg: ModelConfig) -> Any:
  """Parameter shapes and logical annotations without allocating anything (`jax.eval_shape`)."""
  return _abstract_init(cfg)["params"]
