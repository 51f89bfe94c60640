"""The experiment config: every default with a comment, and the frozen dataclasses built from it (its checks are
in `validation`).

Experiment files and the command line speak ml_collections ConfigDicts; nothing below the trainer does.
`model_config`, `optim_config`, `data_config` and `tokenizer_config` turn the sections into the frozen
dataclasses that the library takes, and `with_model` writes a model's dimensions back into the record.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import Any

import ml_collections

from llm_jax import errors
from llm_jax import loop as loop_lib
from llm_jax import model as model_lib
from llm_jax import optim
from llm_jax import steps as steps_lib
from llm_jax import tokenizer as tokenizer_lib
from llm_jax.data import corpus


def _model_defaults() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.family = "gpt2"  # 'gpt2' (learned positions, LayerNorm, GELU, biases) or 'llama'.
  s.vocab_size = 0  # 0: take the tokenizer's vocabulary size.
  s.num_layers = 4  # Transformer blocks.
  s.d_model = 256  # Residual stream width.
  s.num_heads = 4  # Query heads.
  s.num_kv_heads = 0  # 0: same as num_heads (multi-head); fewer: grouped-query attention.
  s.head_dim = 0  # 0: d_model // num_heads.
  s.d_ff = 0  # 0: 4·d_model (gpt2) or 8/3·d_model rounded up to 64 (llama).
  s.max_len = 0  # 0: data.seq_len. Longest position the model supports.
  s.dropout_rate = 0.0  # On embeddings, attention and MLP outputs; 0 for short pre-training runs.
  s.tie_embeddings = True  # Share the input embedding with the output projection.
  s.rope_theta = 10000.0  # Llama family only.
  s.rope_scaling_factor = 0.0  # Llama-3 RoPE scaling; 0 disables.
  s.rope_low_freq_factor = 1.0  # Llama-3 scaling: wavelengths above original_max_len / this are scaled.
  s.rope_high_freq_factor = 4.0  # Llama-3 scaling: wavelengths below original_max_len / this are kept.
  s.rope_original_max_len = 8192  # Llama-3 scaling: the context the RoPE frequencies were trained for.
  s.norm_eps = 1e-5  # LayerNorm (gpt2) or RMSNorm (llama) epsilon.
  s.compute_dtype = "float32"  # float32 on CPU (bf16 is slower there), bfloat16 on TPU/GPU.
  s.scan_layers = True  # Compile one layer and scan it: compile time flat in depth.
  # 'auto', 'none', 'full', 'dots', 'dots_saveable'. 'auto' is 'dots' on CPU (recomputing beats saving there:
  # fwd+bwd 48 vs 69 ms at tiny, 10.2 vs 12.9 s at 10m, BENCHMARKS.md) and 'none' elsewhere (model.AUTO_REMAT).
  s.remat_policy = "auto"
  # 'auto' (splash on TPU, cuDNN on GPU, einsum elsewhere: attention_kernels.AUTO_ATTENTION), 'einsum' or 'jax' (XLA's
  # attention, by our einsums or by jax.nn.dot_product_attention, which is XLA's too in jax 0.10.2), 'splash' (the
  # Pallas TPU kernel; interpreted on CPU, for checks only) or 'cudnn' (GPU: bf16/fp16, head dim a multiple of 8).
  # Decoding runs XLA's attention over the KV cache whatever this says.
  s.attention_impl = "auto"
  s.lora_rank = 0  # LoRA adapter rank; 0 trains every weight. > 0 trains only adapters (needs init_params_from).
  s.lora_alpha = 16.0  # LoRA scale numerator: an adapter adds (x·A)·B·lora_alpha/lora_rank.
  s.lora_targets = "q,v"  # Comma-separated projections to adapt: q, k, v, o (attention), mlp_in, mlp_out.
  s.qk_norm = False  # RMSNorm on each query and key head (learned scale over the head dim), before RoPE.
  s.logit_softcap = 0.0  # Soft-cap the output logits to cap·tanh(logits / cap); 0 disables.
  s.mlp_activation = "default"  # 'default' (gpt2 GELU, llama SwiGLU) or 'relu2' (relu(x)²; llama: in the gate).
  return s


def _data_defaults() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.corpus = "sotu"  # 'sotu' (built in), 'text_files', 'tfds', 'mixture' (of data.mixture) or 'sft' (rows in memory).
  s.text_files = ""  # Glob(s), comma separated, for corpus='text_files': .txt/.gz text, .jsonl[.gz] or .parquet.
  s.text_field = "text"  # The JSONL field or Parquet column holding the text, for text_files of those kinds.
  s.tfds_name = ""  # A TFDS catalog name already prepared under data_dir, for corpus='tfds'.
  s.tfds_text_key = "text"  # The feature holding the document text, for corpus='tfds'.
  s.tfds_train_split = "train"  # Split (or TFDS slice, e.g. 'train[:90%]') to train on.
  s.tfds_validation_split = "validation"  # Split (or slice) held out for validation.
  s.data_dir = ""  # TFDS data dir; '' means ~/.cache/llm_jax/tfds.
  s.store_dir = ""  # Shared token stores (runs and sweeps reuse them); '' is ~/.cache/llm_jax/stores.
  s.validation_fraction = 0.05  # Share of documents held out (text_files corpora).
  s.seq_len = 128  # Tokens per packed training sequence.
  # corpus='mixture': {name: {'corpus': ..., 'weight': share of training tokens, that corpus's settings}}.
  s.mixture = ml_collections.ConfigDict()
  s.sft_files = ""  # Glob(s), comma separated, for corpus='sft': .jsonl[.gz]/.parquet rows (see llm_jax/data/sft.py).
  s.train_on_prompt = False  # corpus='sft': count every token in the loss, not only completions and assistant turns.
  return s


def _tokenizer_defaults() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.model_type = "bpe"  # 'bpe', 'unigram' or 'char'.
  s.vocab_size = 2048  # Pieces to train, 261 of them fixed (ignored for 'char', which takes every character seen).
  s.byte_fallback = True  # Lossless on any UTF-8 text.
  s.path = ""  # An existing tokenizer (sentencepiece .model or HF tokenizer.json) instead of training one.
  return s


def _optim_defaults() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  # 'muon' (the default: 0.29 nats below AdamW at sotu_small, experiments/ablation_knobs.py), 'adamw', 'sgd'
  # (momentum), 'lion', 'adafactor' or 'schedule_free_adamw'.
  s.name = "muon"
  # Peak learning rate; Muon's for the weight matrices. 0: the measured best of the chosen optimizer,
  # optim.DEFAULT_LEARNING_RATES (Muon 0.02, AdamW 3e-3); sgd, lion, adafactor and schedule_free_adamw need one.
  s.learning_rate = 0.0
  s.schedule = "cosine"  # 'constant', 'linear', 'cosine', 'rsqrt', 'wsd'.
  s.warmup_steps = 100  # Linear warm-up from 0 to the peak.
  s.decay_fraction = 0.2  # 'wsd': share of the run spent in the final linear decay.
  s.min_lr_ratio = 0.1  # Final learning rate as a share of the peak (cosine, linear, wsd).
  s.b1 = 0.9  # First-moment decay: AdamW, Muon's AdamW group, Lion; schedule-free's interpolation (y) weight.
  s.b2 = 0.95  # Second-moment decay (AdamW, Muon's AdamW group, schedule-free AdamW); Lion's momentum decay.
  s.eps = 1e-8  # Denominator epsilon (AdamW, Muon, schedule-free AdamW).
  s.weight_decay = 0.1  # Decoupled; never applied to norms, biases or position embeddings.
  s.momentum = 0.9  # 'sgd' only.
  s.nesterov = False  # 'sgd' only.
  s.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables.
  # 'muon' only: peak learning rate of the AdamW group (embeddings, norms, biases, output head); learning_rate
  # is then Muon's, for the weight matrices. Same schedule shape.
  s.adam_learning_rate = 3e-3
  # Per-group learning-rate multipliers, 'group=factor,...' over embed (token and position tables), head
  # (untied output head), norm, bias, matrix (every other weight); unnamed groups keep 1. '' disables.
  s.lr_multipliers = ""
  return s


def _mesh_defaults() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.data = -1  # Pure data parallelism by default; -1 means "the remaining devices".
  s.fsdp = 1  # Parameter and optimizer-state sharding (ZeRO-3 style); also splits the batch.
  s.tensor = 1  # Tensor (model) parallelism over heads and the MLP hidden width.
  return s


def _sample_defaults() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.prompt = "I love computer science"  # Text the samples continue.
  s.max_length = 50  # Counts the prompt, as in Hugging Face generate.
  s.num_return_sequences = 5  # Samples printed.
  s.temperature = 0.8  # Softmax temperature; 0 (or below sampling.GREEDY_BELOW) decodes greedily.
  s.top_k = 40  # Keep the k most likely tokens; 0 keeps all.
  s.top_p = 0.95  # Nucleus sampling mass; 1.0 keeps all.
  return s


def get_config() -> ml_collections.ConfigDict:
  """The defaults every experiment file starts from (a small GPT-2 on the built-in corpus)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameters, dropout and data order.
  c.num_train_steps = 1000  # Optimizer updates in the whole run (the schedule spans these).
  c.stop_at_step = 0  # Stop this invocation early at this step (time-sliced jobs); 0 runs to the end.
  c.global_batch_size = 32  # Sequences per update, summed over all devices and micro-batches.
  c.init_params_from = ""  # A workdir (trained or converted) whose weights, dimensions and tokenizer to start from.
  c.grad_accum_steps = 0  # Micro-batches per update (each global_batch_size / grad_accum_steps); 0: per backend.
  c.on_nonfinite = "stop"  # Non-finite loss/grad norm: 'stop' (keep the last good checkpoint) or 'skip'.
  c.max_skipped_steps = 10  # on_nonfinite='skip': stop after this many non-finite updates in a row (a diverged run).
  # Start over in a workdir that holds an earlier run (run.json, metrics) but no usable checkpoint; without it such a
  # start is refused. Refused beside checkpoints, which a run always resumes.
  c.restart = False
  c.max_replicated_share = 0.05  # Refuse fsdp/tensor meshes replicating more parameter bytes than this.
  c.dry_run = False  # Compile the step for this shape, print memory, FLOPs and shardings, then exit.
  # dry_run/plan: compile for this Cloud TPU slice, by its gcloud name (v5e-8, v5litepod-16, v5p-128, v6e-8, v4-8),
  # on any machine, through libtpu (pip install -e .[tpu]); '' compiles for the devices present.
  c.topology = ""
  # Slices joined by the data-center network: the data axis spans them (a hybrid ICI/DCN mesh; mesh.data counts all
  # slices). Training on real multi-slice hardware and the topology dry run both read it.
  c.num_slices = 1
  c.plan = False  # With topology: rank micro-batch x remat x mesh candidates for the slice (python -m llm_jax.plan).
  c.log_every = 20  # Steps between console/metrics lines (host syncs: these, the first step, evals, saves).
  c.eval_every = 200  # Steps between validation passes; 0 disables periodic evaluation.
  c.eval_batches = 8  # Validation batches per pass.
  c.eval_batch_size = 32  # Sequences per validation batch.
  c.eval_text_files = ""  # Extra eval sets: comma-separated globs, one document per file (loss, bits/byte).
  c.eval_zero_shot_files = ""  # Zero-shot JSONL files scored at every evaluation (accuracy).
  c.eval_harness_tasks = ""  # lm-eval task names (comma-separated) run like eval_zero_shot_files; the eval extra.
  c.eval_harness_include_path = ""  # Folder of lm-eval YAML tasks for eval_harness_tasks (experiments/data/...).
  c.eval_harness_limit = 0  # Items per harness task at each evaluation; 0: all of them.
  c.extra_eval_every = 0  # Steps between the three extra evaluations above; 0: with every validation pass.
  c.checkpoint_every = 200  # Steps between checkpoints (and always at the end).
  c.keep_checkpoints = 3  # Newest checkpoints kept on disk.
  c.peak_flops_per_device = 0.0  # For MFU; 0: datasheet value by device kind, measured on CPU.
  c.z_loss = 0.0  # Adds z_loss·log(Z)² per token to the training loss (logged as z_loss); 0 disables.
  c.profile_steps = ""  # 'START,END': a jax.profiler trace of steps START..END into the workdir's tensorboard/.
  c.model = _model_defaults()
  c.data = _data_defaults()
  c.tokenizer = _tokenizer_defaults()
  c.optim = _optim_defaults()
  c.mesh = _mesh_defaults()
  c.sample = _sample_defaults()  # Generated at the end of training.
  return c


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> model_lib.ModelConfig:
  """Resolves the 0-means-derived model fields into a frozen ModelConfig (`vocab_size`: the tokenizer's)."""
  m = config.model
  head_dim = m.head_dim or (m.d_model // m.num_heads if m.num_heads else 0)
  d_ff = m.d_ff or (64 * math.ceil(8 * m.d_model / 3 / 64) if m.family == "llama" else 4 * m.d_model)
  derived = {"vocab_size": m.vocab_size or vocab_size, "num_kv_heads": m.num_kv_heads or m.num_heads,
             "head_dim": head_dim, "d_ff": d_ff, "max_len": m.max_len or config.data.seq_len}
  return model_lib.ModelConfig(**{**m.to_dict(), **derived})


def _frozen(cls: type, section: ml_collections.ConfigDict) -> Any:
  return cls(**section.to_dict())


def optim_config(config: ml_collections.ConfigDict) -> optim.OptimConfig:
  """Resolves learning_rate=0 to the optimizer's measured default into a frozen OptimConfig."""
  o = _frozen(optim.OptimConfig, config.optim)
  if o.learning_rate == 0:
    if o.name not in optim.DEFAULT_LEARNING_RATES:
      measured = ", ".join(f"{k} {v:g}" for k, v in optim.DEFAULT_LEARNING_RATES.items())
      raise errors.ConfigError(f"optim.learning_rate is unset and optim.name={o.name!r} has no measured default rate; "
                               f"pass --config.optim.learning_rate=<peak rate> (the measured ones: {measured})")
    o = dataclasses.replace(o, learning_rate=optim.DEFAULT_LEARNING_RATES[o.name])
  return o


def step_config(config: ml_collections.ConfigDict) -> steps_lib.StepConfig:
  return steps_lib.StepConfig(seed=config.seed, seq_len=config.data.seq_len,
                              global_batch_size=config.global_batch_size, num_train_steps=config.num_train_steps,
                              grad_accum_steps=config.grad_accum_steps, z_loss=config.z_loss,
                              max_replicated_share=config.max_replicated_share)


def step_configs(config: ml_collections.ConfigDict,
                 vocab_size: int) -> tuple[model_lib.ModelConfig, optim.OptimConfig, steps_lib.StepConfig]:
  """The three frozen records `steps.build` takes, resolved from an experiment config (`vocab_size`: the
  tokenizer's, for model.vocab_size=0)."""
  return model_config(config, vocab_size), optim_config(config), step_config(config)


def loop_plan(config: ml_collections.ConfigDict) -> loop_lib.LoopPlan:
  return loop_lib.LoopPlan(**{f.name: config[f.name] for f in dataclasses.fields(loop_lib.LoopPlan)})


def data_config(config: ml_collections.ConfigDict) -> corpus.DataConfig:
  fields = config.data.to_dict()
  base = corpus.DataConfig(**{**fields, "mixture": ()})
  if base.corpus != "mixture":
    return base
  return dataclasses.replace(base, mixture=corpus.mixture_components(base, fields["mixture"]))


def tokenizer_config(config: ml_collections.ConfigDict) -> tokenizer_lib.TokenizerConfig:
  return _frozen(tokenizer_lib.TokenizerConfig, config.tokenizer)


def with_model(config: ml_collections.ConfigDict, cfg: model_lib.ModelConfig, *, tokenizer_path: str,
               keep_runtime_fields: bool = False) -> ml_collections.ConfigDict:
  """A copy of `config` recording `cfg`'s dimensions and the tokenizer file (a pretrained or converted model).

  With `keep_runtime_fields` the run keeps its own ModelConfig.RUNTIME_FIELDS (how to compute) and ADAPTER_FIELDS.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  kept = model_lib.ModelConfig.RUNTIME_FIELDS + model_lib.ModelConfig.ADAPTER_FIELDS
  for field in dataclasses.fields(cfg):
    if not (keep_runtime_fields and field.name in kept):
      config.model[field.name] = getattr(cfg, field.name)
  config.tokenizer.path = tokenizer_path
  return config


def load_python_file(path: str, what: str, example: str) -> Any:
  """Executes a user's Python file (an experiment or sweep file) as a module; one-line errors if it cannot."""
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"{what} {path} does not exist; pass an existing file, e.g. {example}")
  module_spec = importlib.util.spec_from_file_location("llm_jax_user_file", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  # a user's file can raise anything
    raise errors.ConfigError(f"{what} {path} failed to load ({type(e).__name__}: {e}); fix the file") from e
  return module


def from_file(spec: str) -> ml_collections.ConfigDict:
  """The config an experiment file gives: 'path.py' calls get_config(), 'path.py:variant' get_config(variant)."""
  path, _, variant = spec.partition(":")
  module = load_python_file(path, "config file", "experiments/smoke.py")
  try:
    return module.get_config(variant) if variant else module.get_config()
  except errors.ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # a user's file can raise anything
    raise errors.ConfigError(f"config file {spec} does not give a config ({type(e).__name__}: {e})") from e
