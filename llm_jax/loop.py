"""The training loop's host side: stepping, log windows, evaluation, the non-finite policy and saving."""

from __future__ import annotations

import dataclasses
import time
from typing import Any
from typing import Callable

import jax
import numpy as np

from llm_jax import checkpoint as checkpoint_lib
from llm_jax import errors
from llm_jax import faults
from llm_jax import metrics as metrics_lib
from llm_jax import optim
from llm_jax import profiler as profiler_lib
from llm_jax import sharding
from llm_jax import steps as steps_lib
from llm_jax import writers


@dataclasses.dataclass(frozen=True)
class LoopPlan:
  """When the loop logs, evaluates, saves and stops, and what it does on a non-finite update: the one table of these
  top-level config keys' defaults."""

  num_train_steps: int = 1000  # Optimizer updates in the whole run (the schedule spans these).
  stop_at_step: int = 0  # Stop this invocation early at this step (time-sliced jobs); 0 runs to the end.
  log_every: int = 20  # Steps between console/metrics lines (host syncs: these, the first step, evals, saves).
  eval_every: int = 200  # Steps between validation passes; 0 disables periodic evaluation.
  # Steps between the extra evaluations (eval_text_files, eval_zero_shot_files, eval_harness_tasks); 0: with every
  # validation pass.
  extra_eval_every: int = 0
  checkpoint_every: int = 200  # Steps between checkpoints (and always at the end).
  on_nonfinite: str = "stop"  # Non-finite loss/grad norm: 'stop' (keep the last good checkpoint) or 'skip'.
  max_skipped_steps: int = 10  # on_nonfinite='skip': stop after this many non-finite updates in a row (diverged).
  profile_steps: str = ""  # 'START,END': a jax.profiler trace of steps START..END into the workdir's tensorboard/.

  def check(self) -> None:
    """Refuses (ConfigError, one line naming the key and the fix) what cannot work or would be ignored."""
    errors.require(self.num_train_steps > 0, f"num_train_steps={self.num_train_steps} must be positive")
    errors.require(0 <= self.stop_at_step <= self.num_train_steps, f"stop_at_step={self.stop_at_step} must be between "
                   f"0 and num_train_steps={self.num_train_steps}")
    for key in ("log_every", "checkpoint_every", "max_skipped_steps"):
      errors.require(getattr(self, key) > 0, f"{key}={getattr(self, key)} must be positive")
    for key in ("eval_every", "extra_eval_every"):
      errors.require(getattr(self, key) >= 0, f"{key}={getattr(self, key)} must be >= 0 (0 disables)")
    errors.require_choice("on_nonfinite", self.on_nonfinite, ("stop", "skip"))
    if self.on_nonfinite != "skip":
      errors.refuse_ignored("max_skipped_steps", self.max_skipped_steps, LoopPlan.max_skipped_steps,
                            f"on_nonfinite={self.on_nonfinite!r}", "on_nonfinite=skip")
    profiler_lib.parse_steps(self.profile_steps, self.num_train_steps)


def evaluate(fns: steps_lib.StepFns, params: Any, batches: list[dict[str, np.ndarray]],
             stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
  """Mean validation loss and perplexity over fixed batches; None when `stop()` turned true between two batches."""
  totals = {"nll_sum": 0.0, "tokens": 0.0, "correct": 0.0}
  for batch in batches:
    if stop is not None and stop():
      return None
    out = fns.eval(params, sharding.global_batch(batch, fns.batch_sharding))
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


def _log_line(step: int, total: int, m: dict[str, float]) -> str:
  line = f"step {step:>6d}/{total} | loss {m['loss']:.4f} | lr {m['learning_rate']:.2e} | gnorm {m['grad_norm']:.3f}"
  if "tokens_per_s" not in m:
    return line + " | (no step timed in this window)"
  return (f"{line} | {m['tokens_per_s']:,.0f} tok/s | MFU {100 * m['mfu']:.1f}% | "
          f"{1000 * m['step_time_s']:.0f} ms/step | ETA {_format_duration(m['eta_s'])}")


@dataclasses.dataclass
class Loop:
  """The training loop's host side: what to log, evaluate, check and save after each step.

  Log lines always cover whole `log_every` windows: a checkpoint taken mid-window carries the
  window's per-step metrics (`unlogged`), so a resumed run logs exactly what an uninterrupted one would.
  """

  plan: LoopPlan
  fns: steps_lib.StepFns
  train_iter: Any
  eval_batches: list
  ckpt: checkpoint_lib.Checkpointer
  writer: writers.MetricWriter
  meta: dict[str, Any]
  clock: Throughput
  nonfinite_steps: int = 0
  skipped_in_a_row: int = 0  # non-finite updates since the last finite one (on_nonfinite='skip' bounds them)
  owed: dict[str, bool] = dataclasses.field(default_factory=dict)  # due at the restored step, not done: `_settle_owed`
  unlogged: list[dict[str, float]] = dataclasses.field(default_factory=list)
  extra_eval: Callable[[Any], dict[str, float]] | None = None
  profile_dir: str = ""  # where a profile_steps trace goes (the workdir's TensorBoard directory)
  final_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  preempted: bool = False  # the run stopped on a signal: nothing more is done after its checkpoint

  def run(self, state: steps_lib.TrainState, start_step: int) -> steps_lib.TrainState:
    c = self.plan
    last = c.stop_at_step or c.num_train_steps
    preemption = faults.Preemption()
    preemption.install()
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    trace = profiler_lib.StepProfiler(profiler_lib.parse_steps(c.profile_steps, c.num_train_steps), self.profile_dir)
    try:
      self._settle_owed(start_step, state)
      # Logs and evaluations fall on their intervals and at the true end only, never where a slice
      # (stop_at_step) cuts the run: a cut window travels in the checkpoint (`unlogged`). A preemption saves
      # first and only then exits: what was due at its step travels in the checkpoint too (`owed`).
      for step in range(start_step + 1, last + 1):
        batch = sharding.global_batch(next(self.train_iter), self.fns.batch_sharding)
        trace.before_step(step)
        state, step_metrics = self.fns.train(state, batch)
        trace.after_step(step, step_metrics)
        pending.append((step, step_metrics))
        if step == start_step + 1:  # one sync, so compilation does not count as training throughput
          jax.block_until_ready(step_metrics)
          writers.console(f"step {step:>6d} | compiled and ran the first step in "
                          f"{self.clock.seconds_since_reset():.1f} s")
          self.clock.reset(step)
        due = self._due(step)
        if preemption.should_stop(step):
          self._save_and_exit(step, state, pending, due, preemption.reason)
          break
        completed = self._after_step(step, state, pending, due, preemption.signalled)
        pending = [] if due["log"] else pending
        if due["log"]:
          self.ckpt.check_for_errors()  # a failed background save stops the run now, not at the next save
        if not completed:
          self._save_and_exit(step, state, pending, {"eval": True, "extra_eval": due["extra_eval"]},
                              preemption.reason)
          break
        saved = step == last or step % c.checkpoint_every == 0
        if saved:
          self._save(step, state, pending)
        if preemption.signalled():  # a signal during this step's logging, evaluation or save
          if not saved:
            self._save(step, state, pending)
          self._exit_after_save(step, preemption.reason)
          break
    finally:
      trace.stop()
      preemption.uninstall()
      self.writer.flush()
    return state

  def _due(self, step: int) -> dict[str, bool]:
    """What falls on `step` besides training: a log line, a validation pass, the extra evaluations."""
    c = self.plan
    end = step == c.num_train_steps
    return {"log": step % c.log_every == 0 or end, "eval": bool(c.eval_every and step % c.eval_every == 0) or end,
            "extra_eval": bool(c.extra_eval_every and (step % c.extra_eval_every == 0 or end))}

  def _after_step(self, step: int, state: steps_lib.TrainState, pending: list[tuple[int, dict[str, jax.Array]]],
                  due: dict[str, bool], stop: Callable[[], bool]) -> bool:
    """Logs and evaluates what is due at `step`; False when a signal interrupted the validation pass."""
    if due["log"]:
      self._log(step, pending)
      pending = []
    if due["eval"]:
      self._check_finite(pending)
      if not self._evaluate(step, state, stop):
        return False
    if due["extra_eval"]:
      self._check_finite(pending)
      self._evaluate_extra(step, state)
    return True

  def _save_and_exit(self, step: int, state: steps_lib.TrainState, pending: list[tuple[int, dict[str, jax.Array]]],
                     owed: dict[str, bool], reason: str) -> None:
    """The preemption path: the checkpoint first (with what was due and not done), then nothing but the exit."""
    self._save(step, state, pending, owed)
    self._exit_after_save(step, reason)

  def _exit_after_save(self, step: int, reason: str) -> None:
    # Signals stay caught until the save has committed: a second SIGTERM must not leave only a partial
    # *.orbax-checkpoint-tmp behind.
    self.ckpt.wait_until_saved()
    self.preempted = True
    writers.console(f"step {step:>6d} | {reason}: checkpoint {step} written, exiting")

  def _settle_owed(self, step: int, state: steps_lib.TrainState) -> None:
    """Does what a preempted run saved its checkpoint `step` without doing (its log line, validation, extra
    evaluations), so the resumed record is the uninterrupted one."""
    owed, self.owed = self.owed, {}
    if owed.get("log"):
      self._log(step, [])
    if owed.get("eval"):
      self._evaluate(step, state)
    if owed.get("extra_eval"):
      self._evaluate_extra(step, state)

  def _save(self, step: int, state: steps_lib.TrainState, pending: list[tuple[int, dict[str, jax.Array]]],
            owed: dict[str, bool] | None = None) -> None:
    self._check_finite(pending)
    window = self.unlogged + [{k: float(v) for k, v in m.items()} for m in jax.device_get([m for _, m in pending])]
    data_state = {"iterator": self.train_iter.get_state(), "nonfinite_steps": self.nonfinite_steps,
                  "skipped_in_a_row": self.skipped_in_a_row, "unlogged": window,
                  "owed": {k: True for k, v in (owed or {}).items() if v}}
    self.ckpt.save(step, state, data_state, self.meta)

  def _check_finite(self, pending: list[tuple[int, dict[str, jax.Array]]]) -> list[int]:
    """Steps of `pending` whose update was non-finite; under 'stop', refuses to go on."""
    flags = jax.device_get([m["nonfinite"] for _, m in pending])
    bad = [s for (s, _), flag in zip(pending, flags) if flag]
    if bad and self.plan.on_nonfinite == "stop":
      raise errors.RunError(f"non-finite loss or gradient norm at step {bad[0]}; stopped without saving it "
                            f"({self._last_good()}); lower optim.learning_rate or pass --config.on_nonfinite=skip")
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
    averaged = ("loss", "accuracy", "grad_norm") + (("z_loss",) if "z_loss" in fetched[-1] else ())
    m = {k: float(np.mean(np.asarray([g[k] for g in good], np.float64))) for k in averaged}
    m["learning_rate"] = float(fetched[-1]["learning_rate"])
    m["nonfinite_steps"] = float(self.nonfinite_steps)
    m.update(self.clock.measure(step))
    self.writer.write(step, m)
    writers.console(_log_line(step, self.plan.num_train_steps, m))
    if bad:
      writers.console(f"step {step:>6d} | skipped {len(bad)} non-finite update(s) at steps {bad}")
    self.final_metrics.update(m)
    self._check_skip_bound(step, fetched)

  def _check_skip_bound(self, step: int, fetched: list[dict[str, Any]]) -> None:
    """Under on_nonfinite='skip', stops a run whose updates stay non-finite (it diverged: skipping would run on to
    the end, training nothing), after max_skipped_steps of them in a row."""
    for m in fetched:
      self.skipped_in_a_row = self.skipped_in_a_row + 1 if m["nonfinite"] else 0
    if self.plan.on_nonfinite == "skip" and self.skipped_in_a_row >= self.plan.max_skipped_steps:
      raise errors.RunError(f"the last {self.skipped_in_a_row} updates up to step {step} were all non-finite "
                            f"(on_nonfinite='skip', max_skipped_steps={self.plan.max_skipped_steps}): the run "
                            f"diverged ({self._last_good()}): lower optim.learning_rate, or raise "
                            "--config.max_skipped_steps")

  def _last_good(self) -> str:
    """Where the run's last finite update is kept, for the non-finite stops' messages."""
    latest = self.ckpt.latest()
    return "no checkpoint was written yet" if latest is None else f"newest good checkpoint: step {latest}"

  def _evaluate(self, step: int, state: steps_lib.TrainState, stop: Callable[[], bool] | None = None) -> bool:
    """The validation pass (and the extra evaluations riding on it); False, with nothing written, when `stop()`
    interrupted it."""
    params = optim.eval_params(state.opt_state, state.params)  # schedule-free: its averaged x
    ev = evaluate(self.fns, params, self.eval_batches, stop)
    if ev is None:
      return False
    if self.extra_eval is not None and not self.plan.extra_eval_every:
      ev.update(self.extra_eval(params))
    self.writer.write(step, ev)
    writers.console(f"step {step:>6d}/{self.plan.num_train_steps} | validation loss {ev['val_loss']:.4f} | "
                    f"perplexity {ev['val_perplexity']:.2f}")
    self.final_metrics.update(ev)
    self.clock.reset(step)  # evaluation time is not training throughput
    return True

  def _evaluate_extra(self, step: int, state: steps_lib.TrainState) -> None:
    """The extra eval sets on their own interval (extra_eval_every), logged with the other eval metrics."""
    if self.extra_eval is None:
      return
    ev = self.extra_eval(optim.eval_params(state.opt_state, state.params))
    self.writer.write(step, ev)
    shown = " | ".join(f"{k} {v:.4f}" for k, v in ev.items() if k.endswith(("accuracy", "/acc", "doc_loss")))
    writers.console(f"step {step:>6d}/{self.plan.num_train_steps} | {shown or 'extra evaluation done'}")
    self.final_metrics.update(ev)
    self.clock.reset(step)
