"""`train_and_evaluate(config, workdir)`: the one place that wires data, model, steps, checkpoints and logs."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any
from typing import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from llm_jax import checkpoint as checkpoint_lib
from llm_jax import config as config_lib
from llm_jax import dryrun
from llm_jax import faults
from llm_jax import metrics as metrics_lib
from llm_jax import optim
from llm_jax import sampling
from llm_jax import sharding
from llm_jax import steps as steps_lib
from llm_jax import workdir as workdir_lib
from llm_jax import writers
from llm_jax.data import pipeline
from llm_jax.evals import documents as doc_eval
from llm_jax.model import ModelConfig
from llm_jax.model import check_vocab_fits
from llm_jax.model import count_params
from llm_jax.sweeps import runcard


def to_global(local_batch: dict[str, np.ndarray], batch_sharding: jax.sharding.NamedSharding) -> dict:
  """Assembles the global batch from each process's own rows."""
  def one(x):
    global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding, x, global_shape)
  return {k: one(v) for k, v in local_batch.items()}


def evaluate(fns: steps_lib.StepFns, params: Any, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Mean validation loss and perplexity over fixed batches."""
  totals = {"nll_sum": 0.0, "tokens": 0.0, "correct": 0.0}
  for batch in batches:
    out = fns.eval(params, to_global(batch, fns.batch_sharding))
    for k in totals:
      totals[k] += float(out[k])
  loss = totals["nll_sum"] / max(totals["tokens"], 1.0)
  return {"val_loss": loss, "val_perplexity": metrics_lib.perplexity(loss),
          "val_accuracy": totals["correct"] / max(totals["tokens"], 1.0)}


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@dataclasses.dataclass
class Throughput:
  """Turns wall time between log lines into tokens/s, MFU and ETA.

  `reset` after anything that is not training (evaluation), so only training steps are timed.
  """

  tokens_per_step: int
  flops_per_token: float
  peak_flops: float
  total_steps: int
  last_step: int = 0
  last_time: float = dataclasses.field(default_factory=time.perf_counter)

  def reset(self, step: int) -> None:
    self.last_step, self.last_time = step, time.perf_counter()

  def seconds_since_reset(self) -> float:
    return time.perf_counter() - self.last_time

  def measure(self, step: int) -> dict[str, float]:
    """Throughput of the steps since the last reset; nothing when none were timed (a window that only held the
    first, compiling step after a start or resume), rather than one step's figure over a fraction of its time."""
    now, timed = time.perf_counter(), step - self.last_step
    if timed <= 0:
      return {}
    step_time = (now - self.last_time) / timed
    self.reset(step)
    tokens_per_s = self.tokens_per_step / step_time
    return {"step_time_s": step_time, "tokens_per_s": tokens_per_s,
            "mfu": metrics_lib.mfu(tokens_per_s, self.flops_per_token, self.peak_flops),
            "eta_s": step_time * (self.total_steps - step)}


def _restore_or_init(ckpt: checkpoint_lib.Checkpointer, fns: steps_lib.StepFns, train_iter: Any,
                     init_params_from: str, meta: dict[str, Any],
                     tokenizer_path: str) -> tuple[int, steps_lib.TrainState, dict]:
  """(step, state, saved loop state): the newest usable checkpoint, else a fresh start, optionally from
  another run's weights."""
  check = lambda saved: workdir_lib.check_resumable(saved, meta, tokenizer_path)
  restored = ckpt.restore(fns.abstract_state, fns.state_shardings, check_meta=check)
  if restored is None:
    state = fns.init()
    if init_params_from:
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


def make_steps(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               vocab_size: int) -> tuple[ModelConfig, steps_lib.StepFns]:
  """The model config and the jitted steps an experiment config asks for; call under `jax.set_mesh(mesh)`.

  The one place that turns a config into steps: training, the dry run and the benchmark all use it.
  """
  cfg = config_lib.model_config(config, vocab_size)
  tx, schedule = optim.make_optimizer(config_lib.optim_config(config), config.num_train_steps)
  fns = steps_lib.build_steps(cfg, tx, schedule, mesh, seed=config.seed, seq_len=config.data.seq_len,
                              accum=config.grad_accum_steps)
  sharding.check_replication(fns.abstract_state.params, fns.state_shardings.params, mesh,
                             config.max_replicated_share)
  return cfg, fns


def _prepare_data_once(config: ml_collections.ConfigDict, workdir: str) -> pipeline.PreparedData:
  """Gets the tokenizer and the shared token store (every process tokenises its shards when the store is
  missing; process 0 trains the tokenizer and writes the manifest) and records the store in the workdir."""
  sync = multihost_utils.sync_global_devices if jax.process_count() > 1 else lambda name: None
  data = pipeline.prepare_data(
      config_lib.data_config(config), config_lib.tokenizer_config(config),
      tokenizer_dir=workdir_lib.path(workdir, workdir_lib.TOKENIZER_DIR),
      process_index=jax.process_index(), process_count=jax.process_count(), barrier=sync, log=writers.console)
  if jax.process_index() == 0:
    workdir_lib.write_data_store(workdir, data.store_path)
  writers.console(f"data: token store {data.store_path} ({data.train_num_documents:,} train and "
                  f"{data.val_num_documents:,} validation documents, {data.train_num_tokens:,} train tokens)")
  return data


def dry_run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Compiles the step on the devices present (no data, no tokenizer), prints what it needs and returns it."""
  config = _resolved(config)
  mesh = _mesh(config)
  with jax.set_mesh(mesh):
    cfg, fns = make_steps(config, mesh, config.model.vocab_size or config.tokenizer.vocab_size)
    share = sharding.replicated_fraction(fns.abstract_state.params, fns.state_shardings.params)
    result = dryrun.report(cfg, fns, global_batch_size=config.global_batch_size,
                           seq_len=config.data.seq_len, replicated_share=share)
  writers.console(f"model {cfg.family}: {metrics_lib.flops_per_token(cfg, 1)['non_embedding_params']:,.0f} "
                  f"non-embedding parameters; mesh {dict(mesh.shape)}\n" + dryrun.format_report(result))
  return result


def _extra_evaluator(config: ml_collections.ConfigDict, cfg: ModelConfig,
                     tokenizer: Any) -> doc_eval.TrainingEvaluator | None:
  """The configured extra eval sets (text files, zero-shot JSONL), or None when there are none."""
  text_files = config.eval_text_files.strip()
  zero_shot = [p.strip() for p in config.eval_zero_shot_files.split(",") if p.strip()]
  if not text_files and not zero_shot:
    return None
  if jax.process_count() > 1:
    raise ValueError("eval_text_files and eval_zero_shot_files run on one process only; run "
                     "python -m llm_jax.evaluate on the checkpoints instead")
  text_sets = {"text_files": doc_eval.text_files_documents(text_files)} if text_files else {}
  return doc_eval.TrainingEvaluator(cfg, tokenizer, text_sets=text_sets, zero_shot_files=zero_shot,
                                    seq_len=config.data.seq_len, batch_size=config.eval_batch_size)


def _resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The validated config, with the model dimensions and tokenizer of `init_params_from` when it is set."""
  config_lib.validate(config)
  for key, value in (("init_params_from", config.init_params_from), ("tokenizer.path", config.tokenizer.path),
                     ("data.text_files", config.data.text_files), ("data.data_dir", config.data.data_dir)):
    workdir_lib.check_local(value, f"--config.{key}")
  if not config.init_params_from:
    return config
  source_cfg, tokenizer_path = workdir_lib.read_model_card(config.init_params_from)
  config = config_lib.with_model(config, source_cfg, tokenizer_path=tokenizer_path, keep_runtime_fields=True)
  config_lib.validate(config)
  return config


def _mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  mesh = sharding.make_mesh((config.mesh.data, config.mesh.fsdp, config.mesh.tensor))
  config_lib.validate_for_devices(config, dict(mesh.shape))
  return mesh


def _log_line(step: int, total: int, m: dict[str, float]) -> str:
  line = f"step {step:>6d}/{total} | loss {m['loss']:.4f} | lr {m['learning_rate']:.2e} | gnorm {m['grad_norm']:.3f}"
  if "tokens_per_s" not in m:
    return line + " | (no step timed in this window)"
  return (f"{line} | {m['tokens_per_s']:,.0f} tok/s | MFU {100 * m['mfu']:.1f}% | "
          f"{1000 * m['step_time_s']:.0f} ms/step | ETA {_format_duration(m['eta_s'])}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from the newest checkpoint in `workdir`), evaluates, samples; returns final metrics."""
  if config.dry_run:
    raise ValueError("dry_run=True compiles without training: call trainer.dry_run(config) (the train command "
                     "does), or pass --config.dry_run=False")
  workdir_lib.check_local(workdir, "--workdir")
  config = _resolved(config)
  mesh = _mesh(config)
  os.makedirs(workdir, exist_ok=True)
  lock = faults.WorkdirLock(workdir_lib.lock_path(workdir))
  lock.acquire()
  try:
    return _train_locked(config, workdir, mesh)
  finally:
    lock.release()


def _train_locked(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> dict[str, float]:
  with faults.interruptible("preparing the tokenizer and data"):
    data = _prepare_data_once(config, workdir)
  peak, peak_source = metrics_lib.peak_flops_total(config.peak_flops_per_device)
  if config.model.vocab_size:
    check_vocab_fits(config.model.vocab_size, data.tokenizer.vocab_size,
                     f"model.vocab_size={config.model.vocab_size}; raise model.vocab_size or set it to 0")
  with jax.set_mesh(mesh):
    cfg, fns = make_steps(config, mesh, data.tokenizer.vocab_size)
    ckpt = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir), keep=config.keep_checkpoints)
    train_iter = pipeline.make_train_iterator(
        data, global_batch_size=config.global_batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    meta = workdir_lib.checkpoint_meta(cfg, data.tokenizer.path)
    start_step, state, loop_state = _restore_or_init(ckpt, fns, train_iter, config.init_params_from, meta,
                                                     data.tokenizer.path)
    eval_batches = pipeline.make_eval_batches(
        data, batch_size=config.eval_batch_size, max_batches=config.eval_batches,
        process_index=jax.process_index(), process_count=jax.process_count())
    if jax.process_index() == 0:
      workdir_lib.write_run_config(workdir, config.to_json_best_effort(indent=2))
      workdir_lib.write_model_card(workdir, cfg, data.tokenizer.path)

    writer = writers.MetricWriter(workdir, resume_step=start_step)
    flops = metrics_lib.flops_per_token(cfg, config.data.seq_len)
    writers.console(
        f"model {cfg.family}: {count_params(state.params):,} parameters "
        f"({int(flops['non_embedding_params']):,} non-embedding), {flops['causal'] / 1e6:.2f} MFLOPs/token; "
        f"mesh {dict(mesh.shape)}; peak {peak / 1e9:.0f} GFLOP/s ({peak_source}); "
        f"{'resuming from step ' + str(start_step) if start_step else 'starting from scratch'}")
    clock = Throughput(config.global_batch_size * config.data.seq_len, flops["causal"], peak,
                       config.num_train_steps, last_step=start_step)
    loop = _Loop(config, fns, train_iter, eval_batches, ckpt, writer, meta, clock,
                 nonfinite_steps=int(loop_state.get("nonfinite_steps", 0)),
                 unlogged=list(loop_state.get("unlogged", [])),
                 extra_eval=_extra_evaluator(config, cfg, data.tokenizer))
    card = runcard.start(workdir, config, count_params(state.params))
    started, status = time.perf_counter(), "failed"
    try:
      state = loop.run(state, start_step)
      status = "finished" if int(state.step) == config.num_train_steps else "stopped"
    finally:
      # A close that fails (a full disk, say) must not keep run.json from saying how the run ended.
      try:
        ckpt.close()
      except BaseException:
        status = "failed"
        raise
      finally:
        try:
          writer.close()
        finally:
          runcard.finish(workdir, card, status, loop.final_metrics, time.perf_counter() - started)
    final_metrics = loop.final_metrics
  _print_samples(config, cfg, state.params, data.tokenizer)
  return final_metrics


def _print_samples(config: ml_collections.ConfigDict, cfg: ModelConfig, params: Any, tokenizer: Any) -> None:
  """Continuations of `config.sample.prompt`, decoded on this host's first device."""
  if jax.process_count() > 1:
    params = multihost_utils.process_allgather(params, tiled=True)
  s = config.sample
  max_length = min(s.max_length, cfg.position_limit or s.max_length)
  texts = sampling.generate_texts(params, cfg, tokenizer, s.prompt, max_length=max_length,
                                  num_return_sequences=s.num_return_sequences, temperature=s.temperature,
                                  top_k=s.top_k, top_p=s.top_p, seed=config.seed)
  for i, text in enumerate(texts, 1):
    writers.console(f"--- sample {i}: {text}")


@dataclasses.dataclass
class _Loop:
  """The training loop's host side: what to log, evaluate, check and save after each step.

  Log lines always cover whole `log_every` windows: a checkpoint taken mid-window carries the
  window's per-step metrics (`unlogged`), so a resumed run logs exactly what an uninterrupted one would.
  """

  config: ml_collections.ConfigDict
  fns: steps_lib.StepFns
  train_iter: Any
  eval_batches: list
  ckpt: checkpoint_lib.Checkpointer
  writer: writers.MetricWriter
  meta: dict[str, Any]
  clock: Throughput
  nonfinite_steps: int = 0
  unlogged: list[dict[str, float]] = dataclasses.field(default_factory=list)
  extra_eval: Callable[[Any], dict[str, float]] | None = None
  final_metrics: dict[str, float] = dataclasses.field(default_factory=dict)

  def run(self, state: steps_lib.TrainState, start_step: int) -> steps_lib.TrainState:
    c = self.config
    last = c.stop_at_step or c.num_train_steps
    preemption = faults.Preemption()
    preemption.install()
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    try:
      # Logs and evaluations fall on their intervals and at the true end only, never where a slice
      # (stop_at_step) or a preemption cuts the run: a cut window travels in the checkpoint (`unlogged`).
      for step in range(start_step + 1, last + 1):
        state, step_metrics = self.fns.train(state, to_global(next(self.train_iter), self.fns.batch_sharding))
        pending.append((step, step_metrics))
        if step == start_step + 1:  # one sync, so compilation does not count as training throughput
          jax.block_until_ready(step_metrics)
          writers.console(f"step {step:>6d} | compiled and ran the first step in "
                          f"{self.clock.seconds_since_reset():.1f} s")
          self.clock.reset(step)
        preempted = preemption.should_stop(step)
        if step % c.log_every == 0 or step == c.num_train_steps:
          self._log(step, pending)
          pending = []
        if (c.eval_every and step % c.eval_every == 0) or step == c.num_train_steps:
          self._check_finite(pending)
          self._evaluate(step, state)
        if preempted or step == last or step % c.checkpoint_every == 0:
          self._save(step, state, pending)
        if preempted:
          # Signals stay caught until the save has committed: a second SIGTERM must not leave only a
          # partial *.orbax-checkpoint-tmp behind.
          self.ckpt.wait_until_saved()
          writers.console(f"step {step:>6d} | {preemption.reason}: checkpoint {step} written, exiting")
          break
    finally:
      preemption.uninstall()
      self.writer.flush()
    return state

  def _save(self, step: int, state: steps_lib.TrainState, pending: list[tuple[int, dict[str, jax.Array]]]) -> None:
    self._check_finite(pending)
    window = self.unlogged + [{k: float(v) for k, v in m.items()} for m in jax.device_get([m for _, m in pending])]
    data_state = {"iterator": self.train_iter.get_state(), "nonfinite_steps": self.nonfinite_steps,
                  "unlogged": window}
    self.ckpt.save(step, state, data_state, self.meta)

  def _check_finite(self, pending: list[tuple[int, dict[str, jax.Array]]]) -> list[int]:
    """Steps of `pending` whose update was non-finite; under 'stop', refuses to go on."""
    flags = jax.device_get([m["nonfinite"] for _, m in pending])
    bad = [s for (s, _), flag in zip(pending, flags) if flag]
    if bad and self.config.on_nonfinite == "stop":
      raise faults.RunError(f"non-finite loss or gradient norm at step {bad[0]}; stopped without saving it "
                            f"(newest good checkpoint: step {self.ckpt.latest()}); lower optim.learning_rate "
                            "or pass --config.on_nonfinite=skip")
    return bad

  def _log(self, step: int, pending: list[tuple[int, dict[str, jax.Array]]]) -> None:
    """The loop's host sync at log intervals: fetch the window's metrics, apply the non-finite policy, log."""
    bad = self._check_finite(pending)
    fetched = self.unlogged + jax.device_get([m for _, m in pending])
    self.unlogged = []
    self.nonfinite_steps += sum(1 for m in fetched if m["nonfinite"])
    good = [m for m in fetched if not m["nonfinite"]] or fetched
    # float64 means of exact float32 values: identical whether or not part of the window was carried
    # through a checkpoint as Python floats.
    m = {k: float(np.mean(np.asarray([g[k] for g in good], np.float64))) for k in ("loss", "accuracy", "grad_norm")}
    m["learning_rate"] = float(fetched[-1]["learning_rate"])
    m["nonfinite_steps"] = float(self.nonfinite_steps)
    m.update(self.clock.measure(step))
    self.writer.write(step, m)
    writers.console(_log_line(step, self.config.num_train_steps, m))
    if bad:
      writers.console(f"step {step:>6d} | skipped {len(bad)} non-finite update(s) at steps {bad}")
    self.final_metrics.update(m)

  def _evaluate(self, step: int, state: steps_lib.TrainState) -> None:
    ev = evaluate(self.fns, state.params, self.eval_batches)
    if self.extra_eval is not None:
      ev.update(self.extra_eval(state.params))
    self.writer.write(step, ev)
    writers.console(f"step {step:>6d}/{self.config.num_train_steps} | validation loss {ev['val_loss']:.4f} | "
                    f"perplexity {ev['val_perplexity']:.2f}")
    self.final_metrics.update(ev)
    self.clock.reset(step)  # evaluation time is not training throughput
