"""Hugging Face GPT-2 and Llama checkpoints to and from llm_jax parameters: model configs and weight layouts.

Hugging Face layouts: GPT-2 keeps Conv1D weights as (in, out) and fuses q, k, v into `c_attn` (D, 3D);
Llama keeps torch Linear weights as (out, in). Ours: (D, H, K) projections, (H, K, D) attention output,
(D, F) / (F, D) MLP matrices, (D, V) untied head, layers stacked on axis 0 under `layers` (scan) or
`layers_<i>`. Both layouts apply RoPE to the two halves of each head, so no permutation is needed.
File reading and writing (safetensors, tokenizers, workdirs) lives in `llm_jax.hf.files`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llm_jax import errors
from llm_jax.model_config import ModelConfig

SUPPORTED_MODEL_TYPES = ("gpt2", "llama")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# Tensors some checkpoints store that are not weights: causal-mask and RoPE-table buffers.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
GPT2_PREFIX = "transformer."

# (HF name, our path, kind, leading input dims of ours): 'vec' is a vector, 'conv' an (in, out) matrix,
# 'linear' an (out, in) matrix; ours is the (in, out) matrix reshaped to our shape.
_Entry = tuple[str, str, str, int]
_GPT2_LAYER: tuple[_Entry, ...] = (
    ("ln_1.weight", "attn_norm/scale", "vec", 0), ("ln_1.bias", "attn_norm/bias", "vec", 0),
    ("attn.q.weight", "attn/query", "conv", 1), ("attn.q.bias", "attn/query_bias", "vec", 0),
    ("attn.k.weight", "attn/key", "conv", 1), ("attn.k.bias", "attn/key_bias", "vec", 0),
    ("attn.v.weight", "attn/value", "conv", 1), ("attn.v.bias", "attn/value_bias", "vec", 0),
    ("attn.c_proj.weight", "attn/out", "conv", 2), ("attn.c_proj.bias", "attn/out_bias", "vec", 0),
    ("ln_2.weight", "mlp_norm/scale", "vec", 0), ("ln_2.bias", "mlp_norm/bias", "vec", 0),
    ("mlp.c_fc.weight", "mlp/fc", "conv", 1), ("mlp.c_fc.bias", "mlp/fc_bias", "vec", 0),
    ("mlp.c_proj.weight", "mlp/proj", "conv", 1), ("mlp.c_proj.bias", "mlp/proj_bias", "vec", 0),
)
_GPT2_TOP: tuple[_Entry, ...] = (
    ("wte.weight", "embed", "conv", 1), ("wpe.weight", "pos_embed", "conv", 1),
    ("ln_f.weight", "final_norm/scale", "vec", 0), ("ln_f.bias", "final_norm/bias", "vec", 0),
)
_LLAMA_LAYER: tuple[_Entry, ...] = (
    ("input_layernorm.weight", "attn_norm/scale", "vec", 0),
    ("self_attn.q_proj.weight", "attn/query", "linear", 1),
    ("self_attn.k_proj.weight", "attn/key", "linear", 1),
    ("self_attn.v_proj.weight", "attn/value", "linear", 1),
    ("self_attn.o_proj.weight", "attn/out", "linear", 2),
    ("post_attention_layernorm.weight", "mlp_norm/scale", "vec", 0),
    ("mlp.gate_proj.weight", "mlp/gate", "linear", 1),
    ("mlp.up_proj.weight", "mlp/up", "linear", 1),
    ("mlp.down_proj.weight", "mlp/down", "linear", 1),
)
_LLAMA_TOP: tuple[_Entry, ...] = (
    ("model.embed_tokens.weight", "embed", "conv", 1), ("model.norm.weight", "final_norm/scale", "vec", 0),
)
_HEAD: _Entry = ("lm_head.weight", "lm_head", "linear", 1)


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise errors.DataError(message)


def _field(hf: dict[str, Any], key: str, default: Any) -> Any:
  value = hf.get(key)
  return default if value is None else value


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """Our ModelConfig for a Hugging Face config.json; a one-line ValueError names what is unsupported."""
  model_type = hf.get("model_type")
  if model_type == "gpt2":
    return _gpt2_config(hf)
  if model_type == "llama":
    return _llama_config(hf)
  raise errors.DataError(f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
  act = _field(hf, "activation_function", "gelu_new")
  _require(act in ("gelu_new", "gelu_pytorch_tanh"), f"gpt2 activation_function {act!r} is not supported "
           "(supported: gelu_new, gelu_pytorch_tanh)")
  _require(_field(hf, "scale_attn_weights", True), "gpt2 scale_attn_weights=false is not supported")
  _require(not hf.get("scale_attn_by_inverse_layer_idx"), "gpt2 scale_attn_by_inverse_layer_idx is not supported")
  _require(not hf.get("add_cross_attention"), "gpt2 add_cross_attention is not supported (decoder-only models)")
  d, h = hf["n_embd"], hf["n_head"]
  _require(d % h == 0, f"gpt2 n_embd={d} is not a multiple of n_head={h}")
  return ModelConfig(
      family="gpt2", vocab_size=hf["vocab_size"], num_layers=hf["n_layer"], d_model=d, num_heads=h,
      num_kv_heads=h, head_dim=d // h, d_ff=_field(hf, "n_inner", 4 * d), max_len=hf["n_positions"],
      tie_embeddings=_field(hf, "tie_word_embeddings", True), norm_eps=_field(hf, "layer_norm_epsilon", 1e-5))


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """RoPE settings from either layout: `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters`."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = float(_field(hf, "rope_theta", rope.get("rope_theta", 10000.0)))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in SUPPORTED_ROPE_TYPES:
    raise errors.DataError(f"rope_scaling type {kind!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
  if kind == "default":
    return {"rope_theta": theta}
  return {"rope_theta": theta, "rope_scaling_factor": float(rope["factor"]),
          "rope_low_freq_factor": float(rope["low_freq_factor"]),
          "rope_high_freq_factor": float(rope["high_freq_factor"]),
          "rope_original_max_len": int(rope["original_max_position_embeddings"])}


def _llama_config(hf: dict[str, Any]) -> ModelConfig:
  act = _field(hf, "hidden_act", "silu")
  _require(act == "silu", f"llama hidden_act {act!r} is not supported (supported: silu)")
  for key in ("attention_bias", "mlp_bias"):
    _require(not hf.get(key), f"llama {key}=true is not supported (our Llama family has no biases)")
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = _field(hf, "head_dim", d // h)
  return ModelConfig(
      family="llama", vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], d_model=d,
      num_heads=h, num_kv_heads=_field(hf, "num_key_value_heads", h), head_dim=head_dim,
      d_ff=hf["intermediate_size"], max_len=_field(hf, "max_position_embeddings", 2048),
      tie_embeddings=bool(_field(hf, "tie_word_embeddings", False)), norm_eps=_field(hf, "rms_norm_eps", 1e-6),
      **_rope_fields(hf))


def hf_config_from_model(cfg: ModelConfig, bos_id: int, eos_id: int) -> dict[str, Any]:
  """The Hugging Face config.json of our model (float32 weights); bos_id < 0 writes eos as bos, like GPT-2.

  Refuses, in one line, the knobs neither HF GPT-2 nor HF Llama can express (their models would load and
  silently compute something else). Untied heads are expressed (tie_word_embeddings=false, `lm_head`).
  """
  inexpressible = [f"{name}={value!r}" for name, value, off in (
      ("qk_norm", cfg.qk_norm, False), ("logit_softcap", cfg.logit_softcap, 0.0),
      ("mlp_activation", cfg.mlp_activation, "default")) if value != off]
  _require(not inexpressible, f"the Hugging Face {cfg.family} format cannot express model "
           f"{', '.join(inexpressible)}; export only models trained with these off")
  common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32",
            "bos_token_id": bos_id if bos_id >= 0 else eos_id, "eos_token_id": eos_id}
  if cfg.family == "gpt2":
    _require(cfg.num_kv_heads == cfg.num_heads and cfg.num_heads * cfg.head_dim == cfg.d_model,
             "gpt2 in Hugging Face needs num_kv_heads == num_heads and num_heads * head_dim == d_model")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.d_model,
            "n_head": cfg.num_heads, "n_layer": cfg.num_layers, "n_inner": cfg.d_ff, "n_positions": cfg.max_len,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0,
            "embd_pdrop": 0.0, "attn_pdrop": 0.0, **common}
  rope_scaling = None
  if cfg.rope_scaling_factor > 0:
    rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                    "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                    "original_max_position_embeddings": cfg.rope_original_max_len}
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.d_model,
          "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
          "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
          "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling, "hidden_act": "silu",
          "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, **common}


def _tables(cfg: ModelConfig) -> tuple[str, tuple[_Entry, ...], tuple[_Entry, ...]]:
  """(per-layer name prefix, layer entries, top-level entries) of the family, the head included if untied."""
  head = () if cfg.tie_embeddings else (_HEAD,)
  if cfg.family == "gpt2":
    return "h.{i}.", _GPT2_LAYER, _GPT2_TOP + head
  return "model.layers.{i}.", _LLAMA_LAYER, _LLAMA_TOP + head


def _get(tree: dict[str, Any], path: str) -> Any:
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
  *parents, last = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[last] = value


def _to_ours(name: str, x: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
  matrix = x.T if kind == "linear" else x
  if x.size != math.prod(shape) or (kind != "vec" and x.ndim != 2):
    raise errors.DataError(f"weight {name!r} has shape {tuple(x.shape)}, which does not fit our {shape} for "
                           "this config")
  return np.ascontiguousarray(matrix.reshape(shape), dtype=np.float32)


def _to_hf(x: np.ndarray, kind: str, n_in: int) -> np.ndarray:
  if kind == "vec":
    return np.ascontiguousarray(x.reshape(-1), dtype=np.float32)
  matrix = x.reshape(math.prod(x.shape[:n_in]), -1)
  return np.ascontiguousarray(matrix.T if kind == "linear" else matrix, dtype=np.float32)


def _split_gpt2_qkv(tensors: dict[str, np.ndarray], num_layers: int) -> None:
  """Replaces each fused `c_attn` by the q, k, v tensors our table names (in place)."""
  for i in range(num_layers):
    for suffix, axis in (("weight", 1), ("bias", 0)):
      fused = tensors.pop(f"h.{i}.attn.c_attn.{suffix}", None)
      if fused is None:
        continue
      for part, x in zip("qkv", np.split(fused, 3, axis=axis)):
        tensors[f"h.{i}.attn.{part}.{suffix}"] = x


def _fuse_gpt2_qkv(tensors: dict[str, np.ndarray], num_layers: int) -> None:
  for i in range(num_layers):
    for suffix, axis in (("weight", 1), ("bias", 0)):
      parts = [tensors.pop(f"h.{i}.attn.{part}.{suffix}") for part in "qkv"]
      tensors[f"h.{i}.attn.c_attn.{suffix}"] = np.concatenate(parts, axis=axis)


def normalize_names(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Drops non-weight buffers and GPT-2's optional `transformer.` prefix; splits GPT-2's fused q, k, v."""
  out = {}
  for name, x in tensors.items():
    if name.endswith(IGNORED_SUFFIXES):
      continue
    out[name.removeprefix(GPT2_PREFIX) if cfg.family == "gpt2" else name] = x
  if cfg.family == "gpt2":
    _split_gpt2_qkv(out, cfg.num_layers)
  return out


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig,
                   abstract: dict[str, Any]) -> dict[str, Any]:
  """Our scanned parameter tree (float32 numpy) from HF tensors; consumes `tensors`, which must all be used.

  `abstract` is `nn.unbox(model.abstract_params(cfg))` with scan_layers on: it gives every target shape.
  """
  tensors = normalize_names(tensors, cfg)
  layer_prefix, layer_table, top_table = _tables(cfg)

  def take(name: str) -> np.ndarray:
    if name not in tensors:
      raise errors.DataError(f"the checkpoint has no weight {name!r}, which a {cfg.family} model with this "
                             f"config needs")
    return tensors.pop(name)

  params: dict[str, Any] = {}
  for name, path, kind, _ in top_table:
    _set(params, path, _to_ours(name, take(name), kind, _get(abstract, path).shape))
  layers = []
  for i in range(cfg.num_layers):
    layer: dict[str, Any] = {}
    for suffix, path, kind, _ in layer_table:
      name = layer_prefix.format(i=i) + suffix
      _set(layer, path, _to_ours(name, take(name), kind, _get(abstract["layers"], path).shape[1:]))
    layers.append(layer)
  params["layers"] = _stack(layers)
  if cfg.tie_embeddings:
    tensors.pop(_HEAD[0], None)  # Some checkpoints store the tied head as well.
  if tensors:
    names = sorted(tensors)
    raise errors.DataError(f"the checkpoint has {len(names)} weight(s) a {cfg.family} model does not use, e.g. "
                           f"{', '.join(names[:3])}; the architecture differs from what config.json says")
  return params


def _stack(layers: list[dict[str, Any]]) -> dict[str, Any]:
  if isinstance(layers[0], dict):
    return {k: _stack([layer[k] for layer in layers]) for k in layers[0]}
  return np.stack(layers)


def layer_trees(params: dict[str, Any], cfg: ModelConfig) -> list[dict[str, Any]]:
  """Per-layer parameter trees of a scanned (`layers`) or unrolled (`layers_<i>`) model, as numpy."""
  def unstack(tree: Any, i: int) -> Any:
    return {k: unstack(v, i) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree[i])

  if "layers" in params:
    return [unstack(params["layers"], i) for i in range(cfg.num_layers)]
  return [params[f"layers_{i}"] for i in range(cfg.num_layers)]


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """HF tensors (float32, named as `save_pretrained` names them) from our parameter tree."""
  layer_prefix, layer_table, top_table = _tables(cfg)
  tensors = {name: _to_hf(np.asarray(_get(params, path)), kind, n_in) for name, path, kind, n_in in top_table}
  for i, layer in enumerate(layer_trees(params, cfg)):
    for suffix, path, kind, n_in in layer_table:
      tensors[layer_prefix.format(i=i) + suffix] = _to_hf(np.asarray(_get(layer, path)), kind, n_in)
  if cfg.family == "gpt2":
    _fuse_gpt2_qkv(tensors, cfg.num_layers)
    tensors = {(n if n == _HEAD[0] else GPT2_PREFIX + n): x for n, x in tensors.items()}
  return tensors

