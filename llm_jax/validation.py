"""Every check of an experiment config, run before any data is read or anything compiles: `validate` (the
config alone) and `validate_for_devices` (with the mesh); each failure is one ConfigError naming the key and the fix,
and a setting the chosen mode would ignore is one too."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
from collections.abc import Collection

import jax
import ml_collections

from llm_jax import attention_kernels
from llm_jax import errors
from llm_jax import lora
from llm_jax import model as model_lib
from llm_jax import optim
from llm_jax import paths
from llm_jax import profiler
from llm_jax import sampling
from llm_jax import sharding
from llm_jax import tokenizer as tokenizer_lib
from llm_jax import tpu
from llm_jax.config import data_config
from llm_jax.config import get_config
from llm_jax.config import model_config
from llm_jax.config import optim_config
from llm_jax.data import corpus


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise errors.ConfigError(message)


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
  _choice("data.corpus", d.corpus, corpus.CORPORA)
  _choice("tokenizer.model_type", config.tokenizer.model_type, tokenizer_lib.MODEL_TYPES)
  _choice("optim.name", o.name, optim.OPTIMIZERS)
  _choice("on_nonfinite", config.on_nonfinite, ("stop", "skip"))
  _choice("optim.schedule", o.schedule, optim.SCHEDULES)
  _validate_model(config)
  _validate_run(config)
  _validate_data(config)
  _validate_tokenizer(config)
  _validate_finetune(config)
  _refuse_ignored(config)
  _validate_sample(config)


def _validate_model(config: ml_collections.ConfigDict) -> None:
  m, d = config.model, config.data
  for key in ("num_layers", "d_model", "num_heads"):
    _require(m[key] > 0, f"model.{key}={m[key]} must be positive")
  for key in ("vocab_size", "num_kv_heads", "head_dim", "d_ff", "max_len"):
    _require(m[key] >= 0, f"model.{key}={m[key]} must be >= 0 (0: derived)")
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
  _choice("model.mlp_activation", m.mlp_activation, model_lib.MLP_ACTIVATIONS)
  _require(math.isfinite(m.logit_softcap) and m.logit_softcap >= 0,
           f"model.logit_softcap={m.logit_softcap} must be >= 0 and finite (0 disables; e.g. 30)")


def _validate_run(config: ml_collections.ConfigDict) -> None:
  o = config.optim
  _require(config.num_train_steps > 0, f"num_train_steps={config.num_train_steps} must be positive")
  _require(0 <= config.stop_at_step <= config.num_train_steps, f"stop_at_step={config.stop_at_step} must "
           f"be between 0 and num_train_steps={config.num_train_steps}")
  _require(config.global_batch_size > 0, f"global_batch_size={config.global_batch_size} must be positive "
           "(sequences per optimizer step, over all devices and micro-batches)")
  _require(config.grad_accum_steps >= 0, f"grad_accum_steps={config.grad_accum_steps} must be positive (or 0: "
           "chosen per backend)")
  _require(config.global_batch_size % max(config.grad_accum_steps, 1) == 0,
           f"global_batch_size={config.global_batch_size} does not divide into grad_accum_steps="
           f"{config.grad_accum_steps} micro-batches; make it a multiple")
  _require(math.isfinite(o.learning_rate) and o.learning_rate >= 0,
           f"optim.learning_rate={o.learning_rate} must be positive and finite (or 0: the optimizer's default)")
  _require(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
  _require(o.warmup_steps <= config.num_train_steps, f"optim.warmup_steps={o.warmup_steps} is longer than the "
           f"run (num_train_steps={config.num_train_steps}); the peak learning rate would never be reached: lower "
           "optim.warmup_steps")
  _require(0.0 < o.decay_fraction <= 1.0, f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]")
  _require(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
  for key in ("weight_decay", "grad_clip_norm"):
    _require(o[key] >= 0, f"optim.{key}={o[key]} must be >= 0 (0 disables)")
  resolved = optim_config(config)  # raises ConfigError for an optimizer without a default learning rate
  try:
    optim.check(resolved)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  for key in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_batches", "eval_batch_size",
              "max_skipped_steps"):
    _require(config[key] > 0, f"{key}={config[key]} must be positive")
  _require(0.0 <= config.max_replicated_share <= 1.0,
           f"max_replicated_share={config.max_replicated_share} must be in [0, 1]")
  _require(config.eval_every >= 0, f"eval_every={config.eval_every} must be >= 0 (0 disables)")
  _validate_topology(config)
  _require(math.isfinite(config.z_loss) and config.z_loss >= 0,
           f"z_loss={config.z_loss} must be >= 0 and finite (0 disables; e.g. 1e-4)")
  try:
    profiler.parse_steps(config.profile_steps, config.num_train_steps)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None


def _validate_topology(config: ml_collections.ConfigDict) -> None:
  """A named TPU slice is compiled for by the dry run and the planner only, and needs libtpu to be installed."""
  _require(config.num_slices >= 1, f"num_slices={config.num_slices} must be at least 1")
  _require(not config.plan or bool(config.topology), "plan=True searches meshes and batches for a TPU slice: pass "
           "--config.topology=<slice>, e.g. v5e-8")
  if not config.topology:
    return
  _require(config.dry_run or config.plan, f"topology={config.topology!r} is read by the dry run and the planner "
           "only; pass --config.dry_run=True or --config.plan=True (or clear topology)")
  try:
    tpu.parse_slice(config.topology, config.num_slices)
    tpu.check_libtpu()
  except tpu.TopologyError as e:
    raise errors.ConfigError(str(e)) from None


def _validate_data(config: ml_collections.ConfigDict) -> None:
  d = config.data
  if d.corpus == "mixture":
    _validate_mixture(config)
  _require(0.0 < d.validation_fraction < 1.0, f"data.validation_fraction={d.validation_fraction} must be in (0, 1)")
  if d.corpus == "text_files":
    _require(bool(d.text_files), "data.corpus='text_files' needs --config.data.text_files=<glob>")
    for pattern in filter(None, (p.strip() for p in d.text_files.split(","))):
      paths.check_reachable(pattern, "data.text_files")  # gs:// globs are listed through epath
      _require(bool(paths.glob_files(pattern)), f"data.text_files={pattern!r} matches no "
               "files; pass an existing glob with --config.data.text_files=...")
  for pattern in filter(None, (p.strip() for p in config.eval_text_files.split(","))):
    _require(bool(glob.glob(pattern)), f"eval_text_files={pattern!r} matches no files; pass existing globs")
  for path in filter(None, (p.strip() for p in config.eval_zero_shot_files.split(","))):
    _require(os.path.exists(path), f"eval_zero_shot_files names {path!r}, which does not exist; pass "
             "JSONL files such as experiments/data/zero_shot_example.jsonl")
  if d.corpus == "tfds":
    _require(bool(d.tfds_name), "data.corpus='tfds' needs --config.data.tfds_name=<catalog name>")
  _validate_extra_eval(config)


def _validate_tokenizer(config: ml_collections.ConfigDict) -> None:
  """A tokenizer to train needs room for its fixed pieces (_refuse_ignored refuses training knobs beside a file's).

  With init_params_from the base's tokenizer is used, as its dimensions are (config.with_model), so not checked here.
  """
  t = config.tokenizer
  if config.init_params_from or t.path:
    return
  if t.model_type == "char":
    return  # takes every character seen; vocab_size is not read (config.py says so)
  fixed = tokenizer_lib.NUM_SPECIAL_PIECES + (256 if t.byte_fallback else 0)
  _require(t.vocab_size > fixed, f"tokenizer.vocab_size={t.vocab_size} leaves no room for learned pieces: "
           f"{fixed} pieces are fixed (pad, unk, bos, eos, newline"
           f"{' and 256 byte-fallback pieces' if t.byte_fallback else ''}); pass e.g. "
           "--config.tokenizer.vocab_size=2048")
  m = config.model
  _require(not m.vocab_size or m.vocab_size >= t.vocab_size, f"model.vocab_size={m.vocab_size} is smaller than "
           f"tokenizer.vocab_size={t.vocab_size}: ids past it would have no embedding row; raise model.vocab_size "
           "(or 0: the tokenizer's)")


def _validate_extra_eval(config: ml_collections.ConfigDict) -> None:
  tasks = config.eval_harness_tasks.strip()
  for key, value in (("eval_harness_include_path", config.eval_harness_include_path),
                     ("eval_harness_limit", config.eval_harness_limit)):
    _require(bool(tasks) or not value, f"{key} is set but no eval_harness_tasks are; name the tasks or clear {key}")
  _require(config.eval_harness_limit >= 0, f"eval_harness_limit={config.eval_harness_limit} must be >= 0 (0: all)")
  path = config.eval_harness_include_path
  _require(not path or os.path.isdir(path), f"eval_harness_include_path={path!r} is not a folder; pass the folder "
           "of the tasks' YAML files")
  _require(not tasks or importlib.util.find_spec("lm_eval") is not None, "eval_harness_tasks needs lm_eval, which "
           "is not installed; pip install -e .[eval] (lm-eval==0.4.13)")
  extra = config.eval_text_files.strip() or config.eval_zero_shot_files.strip() or tasks
  _require(config.extra_eval_every >= 0, f"extra_eval_every={config.extra_eval_every} must be >= 0")
  _require(bool(extra) or not config.extra_eval_every, "extra_eval_every is set but there are no eval_text_files, "
           "eval_zero_shot_files or eval_harness_tasks to run; set one or clear extra_eval_every")


def _validate_mixture(config: ml_collections.ConfigDict) -> None:
  """Each component is checked by corpus.mixture_components; the top-level source settings are the components'."""
  defaults = get_config().data
  for key in corpus.COMPONENT_FIELDS[1:]:
    _require(config.data[key] == defaults[key], f"data.{key} is set but data.corpus='mixture' reads each "
             f"component's own; set it in data.mixture.<name>.{key} (or restore data.{key}={defaults[key]!r})")
  try:
    data_config(config)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None


def _validate_finetune(config: ml_collections.ConfigDict) -> None:
  """SFT data and LoRA: both start from a model (its tokenizer, its weights)."""
  m, d = config.model, config.data
  patterns = [p.strip() for p in d.sft_files.split(",") if p.strip()] if d.corpus == "sft" else []
  _require(d.corpus != "sft" or bool(patterns), "data.corpus='sft' needs --config.data.sft_files=<glob of .jsonl>")
  for pattern in patterns:
    _require(bool(glob.glob(os.path.expanduser(pattern))), f"data.sft_files={pattern!r} matches no files; pass an "
             "existing glob with --config.data.sft_files=...")
  _require(d.corpus != "sft" or bool(config.init_params_from or config.tokenizer.path), "data.corpus='sft' fine-tunes"
           " a model and keeps its tokenizer: pass --config.init_params_from=WORKDIR (or --config.tokenizer.path)")
  _require(m.lora_rank >= 0 and (m.lora_rank == 0 or bool(config.init_params_from)), f"model.lora_rank={m.lora_rank}"
           " must be 0 (off) or positive with --config.init_params_from=WORKDIR (the base model the adapters train on)")
  _require(math.isfinite(m.lora_alpha) and m.lora_alpha > 0, f"model.lora_alpha={m.lora_alpha} must be positive")
  # An adapter of rank >= the width is a full-rank update with extra steps: not what LoRA is for, so refused.
  _require(m.lora_rank < m.d_model, f"model.lora_rank={m.lora_rank} is not below model.d_model={m.d_model}: such an "
           "adapter is no smaller than the weight it adapts; lower model.lora_rank (e.g. 8), or train every weight "
           "with model.lora_rank=0")
  try:
    lora.parse_targets(m.lora_targets)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None


def _refuse_ignored(config: ml_collections.ConfigDict) -> None:
  """A setting the chosen corpus, optimizer, schedule or family never reads is an error, not a silent no-op."""
  defaults = get_config()
  m, d, o = config.model, config.data, config.optim
  # (section, keys, the choice that ignores them, the value that would read them)
  ignored = []
  if d.corpus != "text_files":
    ignored.append(("data", ("text_files",), f"data.corpus={d.corpus!r}", "data.corpus=text_files"))
  if d.corpus != "tfds":
    ignored.append(("data", ("tfds_name",), f"data.corpus={d.corpus!r}", "data.corpus=tfds"))
  if d.corpus in ("sotu", "tfds"):  # their splits are fixed (sotu's when built; a TFDS dataset's named splits)
    ignored.append(("data", ("validation_fraction",), f"data.corpus={d.corpus!r}", "data.corpus=text_files"))
  _require(d.corpus == "mixture" or not d.mixture, f"data.mixture is set but data.corpus={d.corpus!r} ignores it; "
           "pass --config.data.corpus=mixture (or clear data.mixture)")
  if d.corpus != "sft":
    ignored.append(("data", ("sft_files", "train_on_prompt"), f"data.corpus={d.corpus!r}", "data.corpus=sft"))
  if m.lora_rank == 0:
    ignored.append(("model", ("lora_alpha", "lora_targets"), "model.lora_rank=0", "model.lora_rank=8"))
  for key, readers in optim.READS.items():
    if o.name not in readers:
      ignored.append(("optim", (key,), f"optim.name={o.name!r}", f"optim.name={readers[0]}"))
  if config.on_nonfinite != "skip":
    ignored.append(("", ("max_skipped_steps",), f"on_nonfinite={config.on_nonfinite!r}", "on_nonfinite=skip"))
  if o.schedule != "wsd":
    ignored.append(("optim", ("decay_fraction",), f"optim.schedule={o.schedule!r}", "optim.schedule=wsd"))
  if config.tokenizer.path and not config.init_params_from:
    ignored.append(("tokenizer", ("model_type", "vocab_size", "byte_fallback"),
                    f"tokenizer.path={config.tokenizer.path!r}", "tokenizer.path='' to train one"))
  if m.family != "llama":
    rope = tuple(k for k in m.keys() if k.startswith("rope_"))
    ignored.append(("model", rope, f"model.family={m.family!r}", "model.family=llama"))
  for section, keys, chooser, reader in ignored:
    for key in keys:
      default, value = (defaults[section][key], config[section][key]) if section else (defaults[key], config[key])
      name = f"{section}.{key}" if section else key
      _require(value == default,
               f"{name} is set but {chooser} ignores it; pass --config.{reader} (or "
               f"{'clear' if default in ('', False) else 'restore'} {name}"
               f"{'' if default in ('', False) else f'={default}'})")


def replaced_by_base(config: ml_collections.ConfigDict, base: model_lib.ModelConfig) -> dict[str, tuple]:
  """With init_params_from the run takes the base model's dimensions (config.with_model): each model field whose
  value in `config` (0-means-derived ones resolved) differs from the base's, as {'model.<field>': (config's, base's)}.
  """
  own = model_config(config, base.vocab_size)
  kept = model_lib.ModelConfig.RUNTIME_FIELDS + model_lib.ModelConfig.ADAPTER_FIELDS
  return {f"model.{f.name}": (getattr(own, f.name), getattr(base, f.name)) for f in dataclasses.fields(base)
          if f.name not in kept and getattr(own, f.name) != getattr(base, f.name)}


def validate_against_base(config: ml_collections.ConfigDict, base: model_lib.ModelConfig,
                          command_line_keys: Collection[str]) -> dict[str, tuple]:
  """Refuses a model setting given on the command line that the base model's dimensions would replace (the
  experiment file's are the recipe's and are replaced), and any tokenizer flag; returns `replaced_by_base`."""
  _require(config.data.seq_len <= base.max_len, f"data.seq_len={config.data.seq_len} is longer than the {base.max_len} "
           f"positions of the base model (--config.init_params_from={config.init_params_from}), whose dimensions the "
           f"run takes; lower --config.data.seq_len to at most {base.max_len}")
  replaced = replaced_by_base(config, base)
  for key in replaced:
    value, base_value = config[key], getattr(base, key.split(".", 1)[1])
    _require(key not in command_line_keys or value == base_value, f"--config.{key}={value} differs from the base "
             f"model's {base_value} (--config.init_params_from={config.init_params_from}), whose dimensions the run "
             f"takes; drop --config.{key}")
  for key in command_line_keys:
    _require(not key.startswith("tokenizer."), f"--config.{key} is set but --config.init_params_from="
             f"{config.init_params_from} brings its own tokenizer, which the run keeps; drop --config.{key}")
  return replaced


def _validate_sample(config: ml_collections.ConfigDict) -> None:
  """The end-of-run sampling settings, checked before training so a bad one cannot cost a whole run.

  The prompt's length in tokens needs the tokenizer; the trainer checks it once the tokenizer is known.
  """
  s = config.sample
  prefix = "--config.sample."
  try:
    sampling.check_settings(max_length=s.max_length, num_return_sequences=s.num_return_sequences,
                            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, prefix=prefix)
    sampling.check_prompt(s.prompt, prefix)
    defaults = get_config().sample
    sampling.sequences_to_decode(temperature=s.temperature, num_return_sequences=s.num_return_sequences,
                                 given=[k for k in ("num_return_sequences", "top_k", "top_p") if s[k] != defaults[k]],
                                 prefix=prefix)
    # With init_params_from the model's dimensions are the source run's, read later; the trainer checks the
    # fit then, with the prompt's length.
    if not config.init_params_from:
      sampling.check_fits(model_config(config, config.model.vocab_size or 1), s.max_length,
                          s.num_return_sequences, prefix)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None


def validate_for_devices(config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                         platform: str | None = None) -> None:
  """Checks that need the devices: the attention kernel must run on their `platform` (default: this backend; 'tpu'
  for a mesh over a TPU topology compiled for from another host) with these shapes, and the batch must split evenly
  over the data-parallel devices."""
  m = config.model
  backend = platform or jax.default_backend()
  capability = getattr(jax.devices()[0], "compute_capability", "9.0") if backend == "gpu" else "9.0"
  try:
    attention_kernels.check_attention_impl(m.attention_impl, backend, compute_dtype=m.compute_dtype,
                                           head_dim=m.head_dim or m.d_model // m.num_heads,
                                           seq_len=config.data.seq_len, gpu_capability=str(capability))
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  data_parallel = sharding.data_parallel_size(mesh_shape)
  accum = max(config.grad_accum_steps, 1)  # 'auto' (0) splits only a batch that divides over the devices
  micro = config.global_batch_size // accum
  _require(micro % data_parallel == 0,
           f"micro-batch of {micro} sequences (global_batch_size={config.global_batch_size} / "
           f"grad_accum_steps={accum}) does not divide over data x fsdp = "
           f"{data_parallel} devices; make global_batch_size a multiple of {data_parallel * accum}")
  _require(config.eval_batch_size % data_parallel == 0,
           f"eval_batch_size={config.eval_batch_size} does not divide over data x fsdp = "
           f"{data_parallel} devices; make it a multiple of {data_parallel}")
