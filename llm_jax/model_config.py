"""The model's record: `ModelConfig`, every dimension and switch of the Transformer with the one table of their
defaults and their checks, and the choices they take (families, remat policies, attention implementations)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import ClassVar

import jax.numpy as jnp

from llm_jax import errors
from llm_jax import lora
from llm_jax.attention_kernels import FUSED_IMPLS

FAMILIES = ("gpt2", "llama")
REMAT_POLICIES = ("auto", "none", "full", "dots", "dots_saveable")
# 'auto' resolves per backend (attention_kernels.AUTO_ATTENTION: splash on TPU, cuDNN on GPU, einsum elsewhere);
# 'einsum' and 'jax' (jax.nn.dot_product_attention, which in jax 0.10.2 runs XLA's attention) are XLA's.
ATTENTION_IMPLS = ("auto", "einsum", "jax") + FUSED_IMPLS
MLP_ACTIVATIONS = ("default", "relu2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every dimension and switch of the model, and the one table of their defaults: the experiment config's model
  section is built from it, with DERIVED_FIELDS at 0 ('derived', resolved by `derive`). No ConfigDict reaches the
  layers."""

  # Fields that may differ between a checkpoint and the run resuming (or starting from) it: they change
  # how the same parameters are computed with, not what the parameters are.
  RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("dropout_rate", "compute_dtype", "scan_layers", "remat_policy",
                                               "attention_impl")
  # LoRA fields: a run fine-tuning adapters sets them; the base model it starts from has rank 0.
  ADAPTER_FIELDS: ClassVar[tuple[str, ...]] = ("lora_rank", "lora_alpha", "lora_targets")
  # Fields an experiment config leaves at 0 to have them derived (`derive`); the defaults below are what they derive
  # to for the default model, data.seq_len and tokenizer.
  DERIVED_FIELDS: ClassVar[tuple[str, ...]] = ("vocab_size", "num_kv_heads", "head_dim", "d_ff", "max_len")

  family: str = "gpt2"  # 'gpt2' (learned positions, LayerNorm, GELU, biases) or 'llama'.
  vocab_size: int = 2048  # Derived: the tokenizer's vocabulary size.
  num_layers: int = 4  # Transformer blocks.
  d_model: int = 256  # Residual stream width.
  num_heads: int = 4  # Query heads.
  num_kv_heads: int = 4  # Derived: num_heads (multi-head); fewer: grouped-query attention.
  head_dim: int = 64  # Derived: d_model // num_heads.
  d_ff: int = 1024  # Derived: 4·d_model (gpt2) or 8/3·d_model rounded up to 64 (llama).
  max_len: int = 128  # Derived: data.seq_len. Longest position the model supports.
  dropout_rate: float = 0.0  # On embeddings, attention and MLP outputs; 0 for short pre-training runs.
  tie_embeddings: bool = True  # Share the input embedding with the output projection.
  rope_theta: float = 10000.0  # Llama family only.
  rope_scaling_factor: float = 0.0  # Llama-3 RoPE scaling; 0 disables.
  rope_low_freq_factor: float = 1.0  # Llama-3 scaling: wavelengths above original_max_len / this are scaled.
  rope_high_freq_factor: float = 4.0  # Llama-3 scaling: wavelengths below original_max_len / this are kept.
  rope_original_max_len: int = 8192  # Llama-3 scaling: the context the RoPE frequencies were trained for.
  norm_eps: float = 1e-5  # LayerNorm (gpt2) or RMSNorm (llama) epsilon.
  compute_dtype: str = "float32"  # float32 on CPU (bf16 is slower there), bfloat16 on TPU/GPU.
  scan_layers: bool = True  # Compile one layer and scan it: compile time flat in depth.
  # 'auto', 'none', 'full', 'dots', 'dots_saveable'. 'auto' is 'dots' on CPU (recomputing beats saving there:
  # fwd+bwd 48 vs 69 ms at tiny, 10.2 vs 12.9 s at 10m, BENCHMARKS.md) and 'none' elsewhere (model.AUTO_REMAT).
  remat_policy: str = "auto"
  # 'auto' (splash on TPU, cuDNN on GPU, einsum elsewhere: attention_kernels.AUTO_ATTENTION), 'einsum' or 'jax' (XLA's
  # attention, by our einsums or by jax.nn.dot_product_attention, which is XLA's too in jax 0.10.2), 'splash' (the
  # Pallas TPU kernel; interpreted on CPU, for checks only) or 'cudnn' (GPU: bf16/fp16, head dim a multiple of 8).
  # Decoding runs XLA's attention over the KV cache whatever this says.
  attention_impl: str = "auto"
  lora_rank: int = 0  # LoRA adapter rank; 0 trains every weight. > 0 trains only adapters (needs init_params_from).
  lora_alpha: float = 16.0  # LoRA scale numerator: an adapter adds (x·A)·B·lora_alpha/lora_rank.
  lora_targets: str = "q,v"  # Comma-separated projections to adapt: q, k, v, o (attention), mlp_in, mlp_out.
  qk_norm: bool = False  # RMSNorm on each query and key head (learned scale over the head dim), before RoPE.
  logit_softcap: float = 0.0  # Soft-cap the output logits to cap·tanh(logits / cap); 0 disables.
  mlp_activation: str = "default"  # 'default' (gpt2 GELU, llama SwiGLU) or 'relu2' (relu(x)²; llama: in the gate).

  @classmethod
  def derive(cls, settings: dict[str, Any], seq_len: int) -> ModelConfig:
    """The model an experiment config's model section (`settings`, DERIVED_FIELDS 0 for derived) describes at
    `seq_len`; a vocab_size of 0 stays 0 until the tokenizer is known (`with_vocab`)."""
    m = dict(settings)
    if not m["head_dim"] and m["num_heads"] > 0 and m["d_model"] % m["num_heads"]:
      raise errors.ConfigError(f"model.num_heads={m['num_heads']} does not divide model.d_model={m['d_model']}; pick "
                               "heads that divide the width or set model.head_dim")
    head_dim = m["head_dim"] or (m["d_model"] // m["num_heads"] if m["num_heads"] > 0 else 0)
    d_ff = m["d_ff"] or (64 * math.ceil(8 * m["d_model"] / 3 / 64) if m["family"] == "llama" else 4 * m["d_model"])
    return cls(**{**m, "num_kv_heads": m["num_kv_heads"] or m["num_heads"], "head_dim": head_dim, "d_ff": d_ff,
                  "max_len": m["max_len"] or seq_len})

  def with_vocab(self, vocab_size: int) -> ModelConfig:
    """This model with the tokenizer's `vocab_size` where its own is 0 (derived)."""
    return self if self.vocab_size else dataclasses.replace(self, vocab_size=vocab_size)

  def check(self) -> None:
    """Refuses (ConfigError, one line naming the model.<key> and the fix) what cannot work or would be ignored."""
    errors.require_choice("model.family", self.family, FAMILIES)
    errors.require_choice("model.remat_policy", self.remat_policy, REMAT_POLICIES)
    errors.require_choice("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
    errors.require_choice("model.compute_dtype", self.compute_dtype, ("float32", "bfloat16"))
    for key in ("num_layers", "d_model", "num_heads"):
      errors.require(getattr(self, key) > 0, f"model.{key}={getattr(self, key)} must be positive")
    for key in self.DERIVED_FIELDS:
      errors.require(getattr(self, key) >= 0, f"model.{key}={getattr(self, key)} must be >= 0 (0: derived)")
    errors.require(self.num_heads % max(self.num_kv_heads, 1) == 0, f"model.num_kv_heads={self.num_kv_heads} does "
                   f"not divide model.num_heads={self.num_heads}; grouped-query attention needs num_heads to be a "
                   "multiple of it")
    errors.require(not self.is_llama or self.head_dim % 2 == 0, f"RoPE needs an even head dimension, got "
                   f"{self.head_dim}; change model.head_dim or model.num_heads")
    errors.require(0.0 <= self.dropout_rate < 1.0, f"model.dropout_rate={self.dropout_rate} must be in [0, 1)")
    errors.require_choice("model.mlp_activation", self.mlp_activation, MLP_ACTIVATIONS)
    errors.require(math.isfinite(self.logit_softcap) and self.logit_softcap >= 0,
                   f"model.logit_softcap={self.logit_softcap} must be >= 0 and finite (0 disables; e.g. 30)")
    errors.require(self.lora_rank >= 0, f"model.lora_rank={self.lora_rank} must be 0 (off) or positive")
    errors.require(math.isfinite(self.lora_alpha) and self.lora_alpha > 0, f"model.lora_alpha={self.lora_alpha} "
                   "must be positive")
    # An adapter of rank >= the width is a full-rank update with extra steps: not what LoRA is for, so refused.
    errors.require(self.lora_rank < self.d_model, f"model.lora_rank={self.lora_rank} is not below model.d_model="
                   f"{self.d_model}: such an adapter is no smaller than the weight it adapts; lower model.lora_rank "
                   "(e.g. 8), or train every weight with model.lora_rank=0")
    lora.parse_targets(self.lora_targets)
    ignored = [(key, "model.lora_rank=0", "model.lora_rank=8")
               for key in (("lora_alpha", "lora_targets") if not self.lora_rank else ())]
    ignored += [(f.name, f"model.family={self.family!r}", "model.family=llama") for f in dataclasses.fields(self)
                if f.name.startswith("rope_") and not self.is_llama]
    for key, chooser, reader in ignored:
      errors.refuse_ignored(f"model.{key}", getattr(self, key), getattr(ModelConfig, key), chooser, reader)

  @property
  def is_llama(self) -> bool:
    return self.family == "llama"

  @property
  def position_limit(self) -> int | None:
    """The longest sequence the model can read: its learned position table (gpt2); None for RoPE (llama)."""
    return None if self.is_llama else self.max_len

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.compute_dtype)


def check_vocab_fits(cfg_vocab_size: int, tokenizer_vocab_size: int, where: str) -> None:
  """Refuses a tokenizer with ids the embedding has no row for; `where` ends the message with the model's side
  and the fix."""
  if tokenizer_vocab_size > cfg_vocab_size:
    raise errors.DataError(f"the tokenizer has {tokenizer_vocab_size} ids but {where}")
