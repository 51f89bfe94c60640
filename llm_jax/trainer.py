"""`train_and_evaluate(run, workdir)`: the one place that wires data, model, steps, checkpoints and logs, for a
resolved RunConfig (`llm_jax.config.resolve`)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any
from typing import Callable

import jax
from jax.experimental import multihost_utils

from llm_jax import checkpoint as checkpoint_lib
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
from llm_jax import workdir as workdir_lib
from llm_jax import writers
from llm_jax.data import pipeline
from llm_jax.evals import documents as doc_eval
from llm_jax.evals import harness
from llm_jax.model import count_params
from llm_jax.model_config import ModelConfig
from llm_jax.model_config import check_vocab_fits
from llm_jax.run_config import RunConfig
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


def prepare_data(run: RunConfig, workdir: str | None = None,
                 check_tokenizer: Callable[[Any], None] = lambda tokenizer: None) -> pipeline.PreparedData:
  """Gets the tokenizer and the shared token store (every process tokenises its shards when the store is missing;
  process 0 trains the tokenizer and writes the manifest), and with a `workdir` copies the tokenizer into it and
  records the store there. SFT rows are small: they are read into memory instead (`pipeline.prepare_sft`), with
  the model's own tokenizer. `check_tokenizer` sees the tokenizer before any document is tokenised. The trainer and
  `python -m llm_jax.prepare` (no workdir) both prepare through here."""
  if run.data.corpus == "sft":
    data = pipeline.prepare_sft(run.data, run.tokenizer)
    check_tokenizer(data.tokenizer)
    writers.console(f"data: {data.train_num_documents:,} train and {data.val_num_documents:,} validation SFT rows "
                    f"from {run.data.sft_files} ({data.train.num_rows:,} packed train rows)")
    return data
  sync = multihost_utils.sync_global_devices if jax.process_count() > 1 else lambda name: None
  data = pipeline.prepare_data(
      run.data, run.tokenizer, tokenizer_dir=workdir_lib.path(workdir, workdir_lib.TOKENIZER_DIR) if workdir else "",
      process_index=jax.process_index(), process_count=jax.process_count(), barrier=sync, log=writers.console,
      check_tokenizer=check_tokenizer)
  if workdir and jax.process_index() == 0:
    workdir_lib.write_data_store(workdir, data.store_paths)
  writers.console(f"data: token store {', '.join(data.store_paths)} ({data.train_num_documents:,} train and "
                  f"{data.val_num_documents:,} validation documents, {data.train_num_tokens:,} train tokens)")
  return data


def compile_report(run: RunConfig) -> tuple[ModelConfig, dict[str, Any], str]:
  """(model config, `dryrun.report`, remat line): the step compiled (no data, no tokenizer) on the devices present,
  or for `run.topology`'s TPU slice through libtpu; dryrun.DoesNotFit when it needs more memory than a chip has."""
  slice_ = tpu.parse_slice(run.topology, run.num_slices) if run.topology else None
  mesh, run = _mesh(run, tpu.devices(slice_) if slice_ else None)
  with target.compiling_for(run.platform.backend), jax.set_mesh(mesh):
    run = run.with_vocab(run.tokenizer.vocab_size)
    fns = steps_lib.build(*run.step_records(), mesh)
    share = sharding.replicated_fraction(fns.abstract_state.params, fns.state_shardings.params)
    result = dryrun.report(run.model, fns, mesh, global_batch_size=run.step.global_batch_size,
                           seq_len=run.data.seq_len, replicated_share=share, slice_=slice_,
                           remat=run.platform.remat_policy)
    return run.model, result, _remat_line(run)


def dry_run(run: RunConfig) -> dict[str, Any]:
  """Compiles the step for the configured devices or TPU slice, prints what it needs per chip and how fast it should
  run, and returns it."""
  cfg, result, remat = compile_report(run)
  writers.console(f"model {cfg.family}: {metrics_lib.flops_per_token(cfg, 1)['non_embedding_params']:,.0f} "
                  f"non-embedding parameters; remat {remat}\n" + dryrun.format_report(result))
  return result


def _extra_evaluator(run: RunConfig, cfg: ModelConfig, tokenizer: Any,
                     full_params: Callable[[Any], Any]) -> Callable[[Any], dict[str, float]] | None:
  """The configured extra eval sets (text files, zero-shot JSONL, lm-eval tasks) as a function of the state's params
  (`full_params` turns them into the model's: LoRA adds the base), or None when there are none."""
  e = run.evals
  if not e.any_extra:
    return None
  if jax.process_count() > 1:
    raise errors.ConfigError("eval_text_files, eval_zero_shot_files and eval_harness_tasks run on one process only; "
                             "run python -m llm_jax.evaluate or python -m llm_jax.harness on the checkpoints instead")
  evaluators = []
  if e.text_files or e.zero_shot_files:
    text_sets = {"text_files": doc_eval.text_files_documents(e.text_files)} if e.text_files else {}
    evaluators.append(doc_eval.TrainingEvaluator(cfg, tokenizer, text_sets=text_sets, zero_shot_files=e.zero_shot_files,
                                                 seq_len=run.data.seq_len, batch_size=e.eval_batch_size))
  if e.harness_tasks:
    backend = harness.Backend(None, cfg, tokenizer, batch_size=e.eval_batch_size, seed=run.seed)
    evaluators.append(harness.HarnessTasks(backend, e.harness_tasks, include_path=e.eval_harness_include_path,
                                           limit=e.eval_harness_limit))
  return lambda params: {k: v for evaluate in evaluators for k, v in evaluate(full_params(params)).items()}


def _mesh(run: RunConfig, devices: list[jax.Device] | None = None) -> tuple[jax.sharding.Mesh, RunConfig]:
  """The configured mesh over `devices` (default: all present), its data axis across `num_slices` slices, and the
  run with its platform choices resolved for it (`RunConfig.on_devices`)."""
  mesh = sharding.make_mesh(run.mesh.requested, devices, run.num_slices)
  return mesh, run.on_devices(dict(mesh.shape), mesh.devices.flat[0].platform)


def train_and_evaluate(run: RunConfig, workdir: str) -> dict[str, float]:
  """Trains (resuming from the newest checkpoint in `workdir`), evaluates, samples; returns final metrics."""
  faults.check_not_importing_main("trainer.train_and_evaluate")
  if run.dry_run:
    raise errors.ConfigError("dry_run=True compiles without training: call trainer.dry_run(run) (the train "
                             "command does), or pass --config.dry_run=False")
  paths.check_reachable(workdir, "--workdir")
  checkpoint_lib.check_reachable(workdir_lib.checkpoint_dir(workdir))
  mesh, run = _mesh(run)
  _make_workdir(workdir)
  lock = faults.WorkdirLock(workdir_lib.lock_path(workdir))
  lock.acquire()
  try:
    return _train_locked(run, workdir, mesh)
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


def _check_tokenizer(run: RunConfig, tokenizer: Any, saved: dict[str, Any] | None) -> None:
  """The checks that need the tokenizer, run as soon as it is known, before any document is tokenised: it fits
  the model's vocabulary, the sample prompt fits sample.max_length, and it is the checkpoint's."""
  if run.model.vocab_size:
    check_vocab_fits(run.model.vocab_size, tokenizer.vocab_size,
                     f"model.vocab_size={run.model.vocab_size}; raise model.vocab_size or set it to 0")
  s = run.sample
  prompt_len = (1 if tokenizer.bos_id >= 0 else 0) + len(tokenizer.encode(s.prompt))  # as generate_texts
  sampling.check_request(run.model.with_vocab(tokenizer.vocab_size), prompt_len, s.max_length,
                         s.num_return_sequences, s.temperature, s.top_k, s.top_p, prefix="--config.sample.")
  if saved is not None:
    workdir_lib.check_tokenizer(saved, paths.file_sha256(tokenizer.path), tokenizer.path)


def _chosen(value: Any, auto: bool, run: RunConfig) -> str:
  """A platform choice as the start-up line prints it: the value the step runs with, and why when 'auto' chose it."""
  return f"{value} (auto on {run.platform.backend})" if auto else str(value)


def _attention_line(run: RunConfig) -> str:
  """The attention the step runs with, why when 'auto' chose it, and its causal query blocks when there are several."""
  p = run.platform
  line = _chosen(p.attention_impl, run.model.attention_impl == "auto", run)
  return line + (f", {p.causal_query_blocks} causal query blocks" if p.causal_query_blocks > 1 else "")


def _remat_line(run: RunConfig) -> str:
  return _chosen(run.platform.remat_policy, run.model.remat_policy == "auto", run)


def _announce_model(run: RunConfig, fns: Any, state: Any, flops: dict[str, float], mesh: jax.sharding.Mesh,
                    peak: tuple[float, str], start_step: int) -> None:
  """The start-up line: parameters (and LoRA's trained share), FLOPs per token, attention, remat, micro-batches, mesh,
  peak, resume point."""
  micro = _chosen(run.platform.grad_accum_steps, not run.step.grad_accum_steps, run)
  writers.console(
      f"model {run.model.family}: {count_params(fns.full_params(state.params)):,} parameters "
      f"{f'({count_params(state.params):,} trained: LoRA adapters) ' if fns.lora else ''}"
      f"({int(flops['non_embedding_params']):,} non-embedding), {flops['causal'] / 1e6:.2f} MFLOPs/token; "
      f"attention {_attention_line(run)}; remat {_remat_line(run)}; micro-batches {micro}; "
      f"mesh {dict(mesh.shape)}; peak {peak[0] / 1e9:.0f} GFLOP/s ({peak[1]}); "
      f"{'resuming from step ' + str(start_step) if start_step else 'starting from scratch'}")


def _train_locked(run: RunConfig, workdir: str, mesh: jax.sharding.Mesh) -> dict[str, float]:
  runcard.read(workdir)  # a damaged run card is refused now, not after preparing data and compiling
  saved, stream = resume.read_history(run, workdir), resume.stream_record(run)
  resume.check_against_checkpoint(run, saved, stream)
  with faults.interruptible("preparing the tokenizer and data"):
    data = prepare_data(run, workdir, lambda tokenizer: _check_tokenizer(run, tokenizer, saved))
  run = run.with_vocab(data.tokenizer.vocab_size)
  peak, peak_source = metrics_lib.peak_flops_total(run.peak_flops_per_device)
  step_model, optim_cfg, step_cfg = run.step_records()  # the platform's attention, remat and micro-batches
  with jax.set_mesh(mesh):
    fns = steps_lib.build(step_model, optim_cfg, step_cfg, mesh)
    ckpt = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir), keep=run.keep_checkpoints,
                                       pins=workdir_lib.path(workdir, workdir_lib.PINS_FILE))
    train_iter = pipeline.make_train_iterator(
        data, global_batch_size=step_cfg.global_batch_size, seed=run.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    lora_base = {}
    if fns.lora:
      fns, lora_base["lora_base"] = _with_lora_base(fns, run.init_params_from, workdir)
    # optim and the optimizer state's tree let a resume with other optim settings be refused by name; the
    # seed and the data stream, one that would silently change the data order or the validation set.
    meta = workdir_lib.checkpoint_meta(run.model, data.tokenizer.path, seed=run.seed, data_stream=stream,
                                       optim=dataclasses.asdict(run.optim),
                                       opt_state_tree=str(jax.tree.structure(fns.abstract_state.opt_state)),
                                       **lora_base)
    start_step, state, loop_state = _restore_or_init(ckpt, fns, train_iter, run.init_params_from, meta,
                                                     data.tokenizer.path, run.restart)
    eval_batches = pipeline.make_eval_batches(
        data, batch_size=run.evals.eval_batch_size, max_batches=run.evals.eval_batches,
        process_index=jax.process_index(), process_count=jax.process_count())
    if jax.process_index() == 0:
      workdir_lib.write_run_config(workdir, run.record())
      workdir_lib.write_model_card(workdir, run.model, data.tokenizer.path, lora_base.get("lora_base"))
    writer = writers.MetricWriter(workdir, resume_step=start_step)
    flops = metrics_lib.flops_per_token(run.model, run.data.seq_len)
    _announce_model(run, fns, state, flops, mesh, (peak, peak_source), start_step)
    clock = loop_lib.Throughput(step_cfg.global_batch_size * run.data.seq_len, flops["causal"], peak,
                                run.loop.num_train_steps, last_step=start_step)
    loop = loop_lib.Loop(run.loop, fns, train_iter, eval_batches, ckpt, writer, meta, clock,
                         nonfinite_steps=int(loop_state.get("nonfinite_steps", 0)),
                         skipped_in_a_row=int(loop_state.get("skipped_in_a_row", 0)),
                         owed=dict(loop_state.get("owed", {})),
                         unlogged=list(loop_state.get("unlogged", [])),
                         extra_eval=_extra_evaluator(run, step_model, data.tokenizer, fns.full_params),
                         profile_dir=workdir_lib.path(workdir, workdir_lib.TENSORBOARD_DIR))
    state, status = _run_recorded(loop, state, start_step, workdir,
                                  runcard.start(workdir, count_params(state.params)))
  if loop.preempted:  # the checkpoint is written; a preempted machine has nothing left to do but exit
    return loop.final_metrics
  try:
    params = fns.full_params(optim.eval_params(state.opt_state, state.params))
    _print_samples(run, *workdir_lib.merge_adapters(step_model, params), data.tokenizer)
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


def _print_samples(run: RunConfig, cfg: ModelConfig, params: Any, tokenizer: Any) -> None:
  """Continuations of `run.sample.prompt`, decoded on this host's first device."""
  if jax.process_count() > 1:
    params = multihost_utils.process_allgather(params, tiled=True)
  s = run.sample
  texts = sampling.generate_texts(params, cfg, tokenizer, s.prompt, max_length=s.max_length,
                                  num_return_sequences=s.check(), temperature=s.temperature,
                                  top_k=s.top_k, top_p=s.top_p, seed=run.seed)
  for i, text in enumerate(texts, 1):
    writers.console(f"--- sample {i}: {text}")
