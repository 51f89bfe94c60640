"""`train_and_evaluate(config, workdir)`: the one place that wires data, model, steps, checkpoints and logs."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Collection
from typing import Any
from typing import Callable

import jax
import ml_collections
from jax.experimental import multihost_utils

from llm_jax import checkpoint as checkpoint_lib
from llm_jax import config as config_lib
from llm_jax import dryrun
from llm_jax import errors
from llm_jax import faults
from llm_jax import loop as loop_lib
from llm_jax import metrics as metrics_lib
from llm_jax import optim
from llm_jax import paths
from llm_jax import resume
from llm_jax import sampling
from llm_jax import sharding
from llm_jax import steps as steps_lib
from llm_jax import target
from llm_jax import tpu
from llm_jax import validation
from llm_jax import workdir as workdir_lib
from llm_jax import writers
from llm_jax.attention import query_blocks
from llm_jax.attention_kernels import resolve_attention_impl
from llm_jax.data import pipeline
from llm_jax.evals import documents as doc_eval
from llm_jax.evals import harness
from llm_jax.model import ModelConfig
from llm_jax.model import check_vocab_fits
from llm_jax.model import count_params
from llm_jax.model import resolve_remat_policy
from llm_jax.sweeps import runcard


def _restore_or_init(ckpt: checkpoint_lib.Checkpointer, fns: steps_lib.StepFns, train_iter: Any,
                     init_params_from: str, meta: dict[str, Any], tokenizer_path: str,
                     restart: bool = False) -> tuple[int, steps_lib.TrainState, dict]:
  """(step, state, saved loop state): the newest usable checkpoint, else a fresh start, optionally from
  another run's weights (under LoRA those are the base, which `_with_lora_base` binds to the steps).

  Raises (before the metric writer exists, so metrics.jsonl is never truncated) rather than start over on
  a workdir whose checkpoints are all unusable, now or in an earlier run, unless `restart` (config.restart) asks
  for it.
  """
  def check(saved: dict[str, Any]) -> None:
    workdir_lib.check_resumable(saved, meta, tokenizer_path)
    if "lora_base" in meta:
      workdir_lib.check_lora_base(saved.get("lora_base"), meta["lora_base"], f"the checkpoints in {ckpt.directory}")
    workdir_lib.check_optim_drift(saved, meta["optim"], meta["opt_state_tree"])

  restored = ckpt.restore(fns.abstract_state, fns.state_shardings, check_meta=check)
  if restored is None:
    if ckpt.quarantined() and not restart:
      raise errors.CheckpointError(
          f"no usable checkpoint in {ckpt.directory}, and earlier runs moved unusable ones to "
          f"{ckpt.unusable_directory} ({', '.join(ckpt.quarantined())}); starting over would overwrite this workdir's "
          "metrics: restore one, or pass --config.restart=True to start over here, or use a new --workdir")
    state = fns.init()
    if init_params_from and not fns.lora:
      source = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(init_params_from), async_save=False)
      try:
        _, params = source.restore_params(fns.abstract_state.params, fns.state_shardings.params)
      finally:
        source.close()
      state = state.replace(params=params)
    return 0, state, {}
  step, state, data_state, _ = restored
  train_iter.set_state(data_state["iterator"])
  return step, state, data_state


def _with_lora_base(fns: steps_lib.StepFns, init_params_from: str,
                    workdir: str) -> tuple[steps_lib.StepFns, dict[str, Any]]:
  """LoRA steps bound to the base weights of `init_params_from`'s newest checkpoint, and the reference to that base
  (workdir, step, model card hash) that checkpoints and the model card keep; the base workdir pins that checkpoint
  first, so its rotation keeps what the adapters need."""
  source = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(init_params_from), async_save=False)
  try:
    steps = source.steps()
    if steps and jax.process_index() == 0:
      workdir_lib.pin_checkpoint(init_params_from, steps[-1], paths.absolute(workdir))
    step, base = source.restore_params(fns.abstract_base, fns.base_shardings, steps[-1] if steps else None)
  finally:
    source.close()
  return fns.with_base(base), workdir_lib.lora_base_reference(init_params_from, step)


def _prepare_data_once(config: ml_collections.ConfigDict, workdir: str,
                       check_tokenizer: Callable[[Any], None]) -> pipeline.PreparedData:
  """Gets the tokenizer and the shared token store (every process tokenises its shards when the store is
  missing; process 0 trains the tokenizer and writes the manifest) and records the store in the workdir. SFT rows
  are small: they are read into memory instead (`pipeline.prepare_sft`), with the model's own tokenizer.
  `check_tokenizer` sees the tokenizer before any document is tokenised."""
  if config.data.corpus == "sft":
    data = pipeline.prepare_sft(config_lib.data_config(config), config_lib.tokenizer_config(config))
    check_tokenizer(data.tokenizer)
    writers.console(f"data: {data.train_num_documents:,} train and {data.val_num_documents:,} validation SFT rows "
                    f"from {config.data.sft_files} ({data.train.num_rows:,} packed train rows)")
    return data
  sync = multihost_utils.sync_global_devices if jax.process_count() > 1 else lambda name: None
  data = pipeline.prepare_data(
      config_lib.data_config(config), config_lib.tokenizer_config(config),
      tokenizer_dir=workdir_lib.path(workdir, workdir_lib.TOKENIZER_DIR),
      process_index=jax.process_index(), process_count=jax.process_count(), barrier=sync, log=writers.console,
      check_tokenizer=check_tokenizer)
  if jax.process_index() == 0:
    workdir_lib.write_data_store(workdir, data.store_paths)
  writers.console(f"data: token store {', '.join(data.store_paths)} ({data.train_num_documents:,} train and "
                  f"{data.val_num_documents:,} validation documents, {data.train_num_tokens:,} train tokens)")
  return data


def compile_report(config: ml_collections.ConfigDict,
                   command_line_keys: Collection[str] = ()) -> tuple[ModelConfig, dict[str, Any], str]:
  """(model config, `dryrun.report`, remat line): the step compiled (no data, no tokenizer) on the devices present,
  or for `config.topology`'s TPU slice through libtpu; dryrun.DoesNotFit when it needs more memory than a chip has."""
  config = _resolved(config, command_line_keys)
  slice_ = tpu.parse_slice(config.topology, config.num_slices) if config.topology else None
  mesh = _mesh(config, tpu.devices(slice_) if slice_ else None)
  platform = "tpu" if slice_ else target.platform()
  with target.compiling_for(platform), jax.set_mesh(mesh):
    cfg, optim_cfg, step_cfg = config_lib.step_configs(config, config.model.vocab_size or config.tokenizer.vocab_size)
    fns = steps_lib.build(cfg, optim_cfg, step_cfg, mesh)
    share = sharding.replicated_fraction(fns.abstract_state.params, fns.state_shardings.params)
    result = dryrun.report(cfg, fns, mesh, global_batch_size=config.global_batch_size, seq_len=config.data.seq_len,
                           replicated_share=share, slice_=slice_,
                           remat=resolve_remat_policy(cfg.remat_policy, platform))
    return cfg, result, _remat_line(cfg)


def dry_run(config: ml_collections.ConfigDict, command_line_keys: Collection[str] = ()) -> dict[str, Any]:
  """Compiles the step for the configured devices or TPU slice, prints what it needs per chip and how fast it should
  run, and returns it."""
  cfg, result, remat = compile_report(config, command_line_keys)
  writers.console(f"model {cfg.family}: {metrics_lib.flops_per_token(cfg, 1)['non_embedding_params']:,.0f} "
                  f"non-embedding parameters; remat {remat}\n" + dryrun.format_report(result))
  return result


def _extra_evaluator(config: ml_collections.ConfigDict, cfg: ModelConfig, tokenizer: Any,
                     full_params: Callable[[Any], Any]) -> Callable[[Any], dict[str, float]] | None:
  """The configured extra eval sets (text files, zero-shot JSONL, lm-eval tasks) as a function of the state's params
  (`full_params` turns them into the model's: LoRA adds the base), or None when there are none."""
  text_files = config.eval_text_files.strip()
  zero_shot = [p.strip() for p in config.eval_zero_shot_files.split(",") if p.strip()]
  tasks = [t.strip() for t in config.eval_harness_tasks.split(",") if t.strip()]
  if not text_files and not zero_shot and not tasks:
    return None
  if jax.process_count() > 1:
    raise errors.ConfigError("eval_text_files, eval_zero_shot_files and eval_harness_tasks run on one process only; "
                             "run python -m llm_jax.evaluate or python -m llm_jax.harness on the checkpoints instead")
  evaluators = []
  if text_files or zero_shot:
    text_sets = {"text_files": doc_eval.text_files_documents(text_files)} if text_files else {}
    evaluators.append(doc_eval.TrainingEvaluator(cfg, tokenizer, text_sets=text_sets, zero_shot_files=zero_shot,
                                                 seq_len=config.data.seq_len, batch_size=config.eval_batch_size))
  if tasks:
    backend = harness.Backend(None, cfg, tokenizer, batch_size=config.eval_batch_size, seed=config.seed)
    evaluators.append(harness.HarnessTasks(backend, tasks, include_path=config.eval_harness_include_path,
                                           limit=config.eval_harness_limit))
  return lambda params: {k: v for evaluate in evaluators for k, v in evaluate(full_params(params)).items()}


def _resolved(config: ml_collections.ConfigDict,
              command_line_keys: Collection[str] = ()) -> ml_collections.ConfigDict:
  """The validated config, with the model dimensions and tokenizer of `init_params_from` when it is set.

  `command_line_keys` are the keys the user set by flag: one of them that the base's dimensions would replace is an
  error; a replaced value from the experiment file is printed.
  """
  validation.validate(config)
  for key, value in (("init_params_from", config.init_params_from), ("tokenizer.path", config.tokenizer.path),
                     ("data.text_files", config.data.text_files), ("data.store_dir", config.data.store_dir)):
    paths.check_reachable(value, f"--config.{key}")
  paths.check_local(config.data.data_dir, "--config.data.data_dir")  # TFDS reads URLs only through TensorFlow
  if not config.init_params_from:
    return config
  source_cfg, tokenizer_path = workdir_lib.read_model_card(config.init_params_from, "--config.init_params_from")
  replaced = validation.validate_against_base(config, source_cfg, command_line_keys)
  if replaced:
    writers.console("init_params_from: the base model's dimensions replace the config's: " + ", ".join(
        f"{key} {value} -> {base_value}" for key, (value, base_value) in replaced.items()))
  config = config_lib.with_model(config, source_cfg, tokenizer_path=tokenizer_path, keep_runtime_fields=True)
  validation.validate(config)
  return config


def _mesh(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The configured mesh over `devices` (default: all present), its data axis across `num_slices` slices."""
  mesh = sharding.make_mesh((config.mesh.data, config.mesh.fsdp, config.mesh.tensor), devices, config.num_slices)
  validation.validate_for_devices(config, dict(mesh.shape), mesh.devices.flat[0].platform)
  return mesh


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       command_line_keys: Collection[str] = ()) -> dict[str, float]:
  """Trains (resuming from the newest checkpoint in `workdir`), evaluates, samples; returns final metrics.

  `command_line_keys`: the config keys set by flag ('model.d_model', ...), which the checks against a base model read.
  """
  faults.check_not_importing_main("trainer.train_and_evaluate")
  if config.dry_run:
    raise errors.ConfigError("dry_run=True compiles without training: call trainer.dry_run(config) (the train "
                             "command does), or pass --config.dry_run=False")
  paths.check_reachable(workdir, "--workdir")
  checkpoint_lib.check_reachable(workdir_lib.checkpoint_dir(workdir))
  config = _resolved(config, command_line_keys)
  mesh = _mesh(config)
  _make_workdir(workdir)
  lock = faults.WorkdirLock(workdir_lib.lock_path(workdir))
  lock.acquire()
  try:
    return _train_locked(config, workdir, mesh)
  finally:
    lock.release()


def _make_workdir(workdir: str) -> None:
  """Creates `workdir` and proves it writable, so a bad path fails in one line before any data is prepared."""
  if paths.as_path(workdir).is_file():
    raise errors.ConfigError(f"--workdir={workdir} is a file, not a directory; pass a directory for checkpoints and "
                             "logs")
  try:
    paths.makedirs(workdir)
    paths.probe_writable(os.path.join(workdir, f".write_probe{os.getpid()}"))
  except OSError as e:
    raise errors.RunError(f"--workdir={workdir} is not writable ({e.strerror or e}); pass a directory you "
                          "can write") from None


def _check_tokenizer(config: ml_collections.ConfigDict, tokenizer: Any, saved: dict[str, Any] | None) -> None:
  """The checks that need the tokenizer, run as soon as it is known, before any document is tokenised: it fits
  the model's vocabulary, the sample prompt fits sample.max_length, and it is the checkpoint's."""
  if config.model.vocab_size:
    check_vocab_fits(config.model.vocab_size, tokenizer.vocab_size,
                     f"model.vocab_size={config.model.vocab_size}; raise model.vocab_size or set it to 0")
  _check_prompt_fits(config, config_lib.model_config(config, tokenizer.vocab_size), tokenizer)
  if saved is not None:
    workdir_lib.check_tokenizer(saved, paths.file_sha256(tokenizer.path), tokenizer.path)


def _check_prompt_fits(config: ml_collections.ConfigDict, cfg: ModelConfig, tokenizer: Any) -> None:
  """The sampling checks that need the tokenizer and the resolved model, before anything compiles."""
  s = config.sample
  prompt_len = (1 if tokenizer.bos_id >= 0 else 0) + len(tokenizer.encode(s.prompt))  # as generate_texts
  # pylint: disable-next=protected-access  # the one validator generate uses, named for the config keys
  sampling._validate(cfg, prompt_len, s.max_length, s.num_return_sequences, s.temperature, s.top_k, s.top_p,
                     prefix="--config.sample.")


def resolved_choices(cfg: ModelConfig, accum: int, seq_len: int) -> dict[str, Any]:
  """What the settings chosen per backend ('auto' attention and remat, grad_accum_steps 0, the causal query blocks
  of attention.CAUSAL_BLOCKS) run as here: written into config.json under 'resolved', beside the settings as given."""
  backend = target.platform()
  impl = resolve_attention_impl(cfg.attention_impl, backend)
  return {"backend": backend, "attention_impl": impl, "causal_query_blocks": query_blocks(impl, backend, seq_len),
          "remat_policy": resolve_remat_policy(cfg.remat_policy, backend), "grad_accum_steps": accum}


def _attention_line(cfg: ModelConfig, seq_len: int) -> str:
  """The attention the step runs with, why when 'auto' chose it, and its causal query blocks when there are several."""
  backend = target.platform()
  resolved = resolve_attention_impl(cfg.attention_impl, backend)
  blocks = query_blocks(resolved, backend, seq_len)
  line = f"{resolved} (auto on {backend})" if cfg.attention_impl == "auto" else resolved
  return line + (f", {blocks} causal query blocks" if blocks > 1 else "")


def _remat_line(cfg: ModelConfig) -> str:
  """The remat policy the step runs with, and why when 'auto' chose it."""
  backend = target.platform()
  resolved = resolve_remat_policy(cfg.remat_policy, backend)
  return f"{resolved} (auto on {backend})" if cfg.remat_policy == "auto" else resolved


def _accum_line(fns: Any, accum_given: int) -> str:
  """The micro-batches per update the step runs, and why when 'auto' (0) chose them."""
  return f"{fns.accum} (auto on {target.platform()})" if not accum_given else str(fns.accum)


def _announce_model(cfg: ModelConfig, fns: Any, state: Any, flops: dict[str, float], mesh: jax.sharding.Mesh,
                    peak: tuple[float, str], start_step: int, accum_given: int, seq_len: int) -> None:
  """The start-up line: parameters (and LoRA's trained share), FLOPs per token, attention, remat, micro-batches, mesh,
  peak, resume point."""
  writers.console(
      f"model {cfg.family}: {count_params(fns.full_params(state.params)):,} parameters "
      f"{f'({count_params(state.params):,} trained: LoRA adapters) ' if fns.lora else ''}"
      f"({int(flops['non_embedding_params']):,} non-embedding), {flops['causal'] / 1e6:.2f} MFLOPs/token; "
      f"attention {_attention_line(cfg, seq_len)}; remat {_remat_line(cfg)}; "
      f"micro-batches {_accum_line(fns, accum_given)}; mesh {dict(mesh.shape)}; "
      f"peak {peak[0] / 1e9:.0f} GFLOP/s ({peak[1]}); "
      f"{'resuming from step ' + str(start_step) if start_step else 'starting from scratch'}")


def _train_locked(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> dict[str, float]:
  runcard.read(workdir)  # a damaged run card is refused now, not after preparing data and compiling
  saved, stream = resume.read_history(config, workdir), resume.stream_record(config)
  resume.check_against_checkpoint(config, saved, stream)
  with faults.interruptible("preparing the tokenizer and data"):
    data = _prepare_data_once(config, workdir, lambda tokenizer: _check_tokenizer(config, tokenizer, saved))
  peak, peak_source = metrics_lib.peak_flops_total(config.peak_flops_per_device)
  with jax.set_mesh(mesh):
    cfg, optim_cfg, step_cfg = config_lib.step_configs(config, data.tokenizer.vocab_size)
    fns = steps_lib.build(cfg, optim_cfg, step_cfg, mesh)
    ckpt = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir), keep=config.keep_checkpoints,
                                       pins=workdir_lib.path(workdir, workdir_lib.PINS_FILE))
    train_iter = pipeline.make_train_iterator(
        data, global_batch_size=config.global_batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    lora_base = {}
    if fns.lora:
      fns, lora_base["lora_base"] = _with_lora_base(fns, config.init_params_from, workdir)
    # optim and the optimizer state's tree let a resume with other optim settings be refused by name; the
    # seed and the data stream, one that would silently change the data order or the validation set.
    meta = workdir_lib.checkpoint_meta(cfg, data.tokenizer.path, seed=config.seed,
                                       data_stream=stream,
                                       optim=dataclasses.asdict(config_lib.optim_config(config)),
                                       opt_state_tree=str(jax.tree.structure(fns.abstract_state.opt_state)),
                                       **lora_base)
    start_step, state, loop_state = _restore_or_init(ckpt, fns, train_iter, config.init_params_from, meta,
                                                     data.tokenizer.path, config.restart)
    eval_batches = pipeline.make_eval_batches(
        data, batch_size=config.eval_batch_size, max_batches=config.eval_batches,
        process_index=jax.process_index(), process_count=jax.process_count())
    if jax.process_index() == 0:
      record = {**json.loads(config.to_json_best_effort()),
                "resolved": resolved_choices(cfg, fns.accum, config.data.seq_len)}
      workdir_lib.write_run_config(workdir, json.dumps(record, indent=2))
      workdir_lib.write_model_card(workdir, cfg, data.tokenizer.path, lora_base.get("lora_base"))
    writer = writers.MetricWriter(workdir, resume_step=start_step)
    flops = metrics_lib.flops_per_token(cfg, config.data.seq_len)
    _announce_model(cfg, fns, state, flops, mesh, (peak, peak_source), start_step, config.grad_accum_steps,
                    config.data.seq_len)
    clock = loop_lib.Throughput(config.global_batch_size * config.data.seq_len, flops["causal"], peak,
                                config.num_train_steps, last_step=start_step)
    loop = loop_lib.Loop(config_lib.loop_plan(config), fns, train_iter, eval_batches, ckpt, writer, meta, clock,
                         nonfinite_steps=int(loop_state.get("nonfinite_steps", 0)),
                         skipped_in_a_row=int(loop_state.get("skipped_in_a_row", 0)),
                         owed=dict(loop_state.get("owed", {})),
                         unlogged=list(loop_state.get("unlogged", [])),
                         extra_eval=_extra_evaluator(config, cfg, data.tokenizer, fns.full_params),
                         profile_dir=workdir_lib.path(workdir, workdir_lib.TENSORBOARD_DIR))
    state, status = _run_recorded(loop, state, start_step, workdir, runcard.start(workdir, config,
                                                                                   count_params(state.params)))
  if loop.preempted:  # the checkpoint is written; a preempted machine has nothing left to do but exit
    return loop.final_metrics
  try:
    params = fns.full_params(optim.eval_params(state.opt_state, state.params))
    _print_samples(config, *workdir_lib.merge_adapters(cfg, params), data.tokenizer)
  except ValueError as e:
    # The training itself ended well (run.json says so); the exit status must still say sampling did not.
    raise errors.RunError(f"training {status} (checkpoint {int(state.step)}); sampling failed: {e}") from None
  return loop.final_metrics


def _run_recorded(loop: loop_lib.Loop, state: steps_lib.TrainState, start_step: int, workdir: str,
                  card: dict[str, Any]) -> tuple[steps_lib.TrainState, str]:
  """Runs the loop, closes the checkpointer and writer, and records in run.json how it ended, whatever happens."""
  started, status = time.perf_counter(), "failed"
  try:
    state = loop.run(state, start_step)
    # A preemption at the last step leaves its final log and evaluation to the resumed run: not finished yet.
    status = "finished" if int(state.step) == loop.plan.num_train_steps and not loop.preempted else "stopped"
  finally:
    # A close that fails (a full disk, say) must not keep run.json from saying how the run ended.
    try:
      loop.ckpt.close()
    except BaseException:
      status = "failed"
      raise
    finally:
      try:
        loop.writer.close()
      finally:
        runcard.finish(workdir, card, status, loop.final_metrics, time.perf_counter() - started)
  return state, status


def _print_samples(config: ml_collections.ConfigDict, cfg: ModelConfig, params: Any, tokenizer: Any) -> None:
  """Continuations of `config.sample.prompt`, decoded on this host's first device."""
  if jax.process_count() > 1:
    params = multihost_utils.process_allgather(params, tiled=True)
  s = config.sample
  num = sampling.sequences_to_decode(temperature=s.temperature, num_return_sequences=s.num_return_sequences,
                                     given=())  # validation refused a count set beside greedy decoding
  texts = sampling.generate_texts(params, cfg, tokenizer, s.prompt, max_length=s.max_length,
                                  num_return_sequences=num, temperature=s.temperature,
                                  top_k=s.top_k, top_p=s.top_p, seed=config.seed)
  for i, text in enumerate(texts, 1):
    writers.console(f"--- sample {i}: {text}")
