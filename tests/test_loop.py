"""llm_jax/loop.py without a model: `evaluate` against known per-batch sums, Throughput's arithmetic on a fake clock,
the log line, and Loop.run driven by fake steps, checkpointer and writer (intervals, slices, preemption, the
non-finite policy), each against records worked out by hand or an uninterrupted run."""

import math
import os
import signal
import time

import jax
import numpy as np
import pytest
from conftest import raises_one_line

from llm_jax import errors
from llm_jax import loop as loop_lib
from llm_jax import sharding
from llm_jax import steps as steps_lib

TIMING = ("step_time_s", "tokens_per_s", "mfu", "eta_s")


def _plan(**overrides):
  fields = {"num_train_steps": 10, "stop_at_step": 0, "log_every": 4, "eval_every": 5, "extra_eval_every": 0,
            "checkpoint_every": 6, "on_nonfinite": "stop", "max_skipped_steps": 10, "profile_steps": ""}
  fields.update(overrides)
  return loop_lib.LoopPlan(**fields)


def _batch_sharding():
  return sharding.batch_sharding(sharding.make_mesh((8, 1, 1), jax.devices()))


class FakeFns:
  """The two entry points the loop calls: `eval` answers the queued sums; `train` scripts each step's metrics (loss
  = step, or `bad` steps non-finite) and checks that it got the iterator's batch for that step."""

  def __init__(self, eval_outputs=(), bad=()):
    self.batch_sharding = _batch_sharding()
    self.eval_outputs, self.bad = list(eval_outputs), set(bad)
    self.eval_batches_seen, self.on_step = [], {}

  def eval(self, params, batch):
    self.eval_batches_seen.append(batch)
    out = self.eval_outputs[len(self.eval_batches_seen) - 1] if self.eval_outputs else (6.0, 4.0, 1.0)
    return dict(zip(("nll_sum", "tokens", "correct"), map(np.float32, out)))

  def train(self, state, batch):
    step = int(state.step) + 1
    assert isinstance(batch["inputs"], jax.Array) and batch["inputs"].sharding == self.batch_sharding
    assert int(np.asarray(batch["inputs"])[0, 0]) == step  # the iterator's batch for this step
    if step in self.on_step:
      self.on_step[step]()
    bad = step in self.bad
    metrics = {"loss": np.float32("nan" if bad else step), "accuracy": np.float32(step / 100),
               "grad_norm": np.float32(1 + step), "learning_rate": np.float32(step / 1000),
               "tokens": np.float32(32), "nonfinite": np.float32(bad)}
    return state.replace(step=state.step + 1), metrics


class FakeIter:
  def __init__(self, next_index=0):
    self.next_index = next_index

  def __next__(self):
    self.next_index += 1
    return {"inputs": np.full((8, 4), self.next_index, np.int32)}

  def get_state(self):
    return {"next_index": self.next_index}


class FakeCkpt:
  def __init__(self):
    self.saved = []  # (step, data_state, meta)

  def save(self, step, state, data_state, meta):
    assert int(state.step) == step
    self.saved.append((step, data_state, meta))

  def latest(self):
    return self.saved[-1][0] if self.saved else None

  def check_for_errors(self):
    pass

  def wait_until_saved(self):
    pass


class FakeWriter:
  def __init__(self):
    self.records = []

  def write(self, step, scalars):
    self.records.append((step, dict(scalars)))

  def flush(self):
    pass


def _state(step=0):
  return steps_lib.TrainState(step=np.int32(step), params={"w": np.float32(1)}, opt_state=(), rng=np.zeros(2))


def _loop(plan, fns=None, start=0, **kwargs):
  clock = loop_lib.Throughput(32, 1.0, 1e9, plan.num_train_steps, last_step=start)
  return loop_lib.Loop(plan, fns or FakeFns(), FakeIter(start), [{"inputs": np.zeros((8, 4), np.int32)}],
                       FakeCkpt(), FakeWriter(), {"seed": 0}, clock, **kwargs)


def _untimed(records):
  return [(step, {k: v for k, v in r.items() if k not in TIMING}) for step, r in records]


# evaluate

def test_evaluate_weights_each_batch_by_its_tokens():
  fns = FakeFns(eval_outputs=[(10.0, 4.0, 1.0), (2.0, 12.0, 9.0)])
  batches = [{"inputs": np.full((8, 4), i, np.int32)} for i in range(2)]
  ev = loop_lib.evaluate(fns, None, batches)
  assert ev == pytest.approx({"val_loss": 12 / 16, "val_perplexity": math.exp(12 / 16), "val_accuracy": 10 / 16})
  for seen, batch in zip(fns.eval_batches_seen, batches):
    assert seen["inputs"].sharding == fns.batch_sharding
    np.testing.assert_array_equal(np.asarray(seen["inputs"]), batch["inputs"])


def test_evaluate_returns_none_when_stop_turns_true_between_batches():
  batches = [{"inputs": np.zeros((8, 4), np.int32)}] * 3
  fns = FakeFns()
  assert loop_lib.evaluate(fns, None, batches, stop=lambda: len(fns.eval_batches_seen) == 1) is None
  assert len(fns.eval_batches_seen) == 1
  fns = FakeFns()
  assert loop_lib.evaluate(fns, None, batches, stop=lambda: True) is None
  assert not fns.eval_batches_seen
  assert loop_lib.evaluate(FakeFns(), None, batches, stop=lambda: False)["val_loss"] == 1.5


def test_evaluate_stays_finite_without_tokens_and_caps_the_perplexity():
  zero = loop_lib.evaluate(FakeFns(eval_outputs=[(0.0, 0.0, 0.0)]), None, [{"x": np.zeros((8, 1))}])
  assert zero == {"val_loss": 0.0, "val_perplexity": 1.0, "val_accuracy": 0.0}
  huge = loop_lib.evaluate(FakeFns(eval_outputs=[(8000.0, 4.0, 0.0)]), None, [{"x": np.zeros((8, 1))}])
  assert huge["val_loss"] == 2000.0 and huge["val_perplexity"] == math.exp(700)


# Throughput, the duration and the log line

class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_throughput_turns_a_window_into_tokens_per_second_mfu_and_eta(monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(time, "perf_counter", clock)
  t = loop_lib.Throughput(tokens_per_step=4096, flops_per_token=6e6, peak_flops=1e12, total_steps=100,
                          last_step=10, last_time=clock.now)
  clock.now += 2.0  # steps 11..20 in 2 s
  assert t.seconds_since_reset() == 2.0
  m = t.measure(20)
  assert m == pytest.approx({"step_time_s": 0.2, "tokens_per_s": 4096 / 0.2, "mfu": 4096 / 0.2 * 6e6 / 1e12,
                             "eta_s": 0.2 * 80})
  assert (t.last_step, t.last_time) == (20, clock.now)  # measuring starts the next window
  clock.now += 5.0
  t.reset(25)  # an evaluation: its 5 s are not training
  clock.now += 1.5
  assert t.measure(28) == pytest.approx({"step_time_s": 0.5, "tokens_per_s": 8192, "mfu": 8192 * 6e-6,
                                         "eta_s": 36.0})


def test_throughput_of_a_window_without_timed_steps_is_empty(monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(time, "perf_counter", clock)
  t = loop_lib.Throughput(4096, 6e6, 1e12, 100, last_step=7, last_time=clock.now)
  clock.now += 30.0  # e.g. the compiling first step after a resume
  assert not t.measure(7)
  assert (t.last_step, t.last_time) == (7, 100.0)  # nothing reset


@pytest.mark.parametrize("seconds, text", [(0, "0m00s"), (59.9, "0m59s"), (61, "1m01s"), (3599, "59m59s"),
                                           (3600, "1h00m"), (3661, "1h01m"), (90061, "25h01m"), (-5, "0m00s")])
def test_format_duration(seconds, text):
  assert loop_lib._format_duration(seconds) == text  # pylint: disable=protected-access


def test_log_line_with_and_without_throughput():
  m = {"loss": 2.34567, "learning_rate": 3e-4, "grad_norm": 1.23456}
  line = loop_lib._log_line(40, 1000, m)  # pylint: disable=protected-access
  assert line == "step     40/1000 | loss 2.3457 | lr 3.00e-04 | gnorm 1.235 | (no step timed in this window)"
  m.update(tokens_per_s=12345.6, mfu=0.4567, step_time_s=0.0815, eta_s=3725)
  assert loop_lib._log_line(40, 1000, m) == (  # pylint: disable=protected-access
      "step     40/1000 | loss 2.3457 | lr 3.00e-04 | gnorm 1.235 | 12,346 tok/s | MFU 45.7% | 82 ms/step | "
      "ETA 1h02m")


# Loop

def test_due_puts_logs_and_evaluations_on_their_intervals_and_all_at_the_end():
  loop = _loop(_plan(num_train_steps=10, log_every=3, eval_every=0, extra_eval_every=4))
  due = {step: tuple(k for k, v in loop._due(step).items() if v) for step in range(1, 11)}  # pylint: disable=protected-access
  assert due == {1: (), 2: (), 3: ("log",), 4: ("extra_eval",), 5: (), 6: ("log",), 7: (), 8: ("extra_eval",),
                 9: ("log",), 10: ("log", "eval", "extra_eval")}


def test_run_logs_evaluates_and_saves_on_their_intervals():
  loop = _loop(_plan(num_train_steps=10, log_every=4, eval_every=5, checkpoint_every=6))
  state = loop.run(_state(), 0)
  assert int(state.step) == 10 and loop.train_iter.next_index == 10
  val = {"val_loss": 1.5, "val_perplexity": math.exp(1.5), "val_accuracy": 0.25}
  train = lambda steps: {"loss": np.mean(steps), "accuracy": np.mean(steps) / 100, "grad_norm": 1 + np.mean(steps),
                         "learning_rate": steps[-1] / 1000, "nonfinite_steps": 0.0}
  expected = [(4, train([1, 2, 3, 4])), (5, val), (8, train([5, 6, 7, 8])), (10, train([9, 10])), (10, val)]
  got = _untimed(loop.writer.records)
  assert [s for s, _ in got] == [s for s, _ in expected]
  for (_, g), (_, e) in zip(got, expected):
    assert g == pytest.approx(e)
  assert all(set(TIMING) <= set(r) for s, r in loop.writer.records if "loss" in r)  # 3 timed steps or more each
  assert [s for s, _, _ in loop.ckpt.saved] == [6, 10]
  step, data_state, meta = loop.ckpt.saved[0]
  assert meta == {"seed": 0} and data_state["iterator"] == {"next_index": 6}
  assert [r["loss"] for r in data_state["unlogged"]] == [5.0, 6.0]  # the open window travels with checkpoint 6
  assert data_state["owed"] == {} and loop.ckpt.saved[1][1]["unlogged"] == []
  assert loop.final_metrics["val_loss"] == 1.5 and loop.final_metrics["loss"] == 9.5 and not loop.preempted


def test_the_first_step_of_a_run_is_not_timed():
  loop = _loop(_plan(num_train_steps=3, log_every=1, eval_every=0, checkpoint_every=100))
  loop.run(_state(), 0)
  timed = [s for s, r in loop.writer.records if "tokens_per_s" in r]
  assert [s for s, r in loop.writer.records if "loss" in r] == [1, 2, 3] and timed == [2, 3]


def test_a_run_sliced_inside_a_log_window_writes_the_records_of_an_uninterrupted_one():
  straight = _loop(_plan())
  straight.run(_state(), 0)
  state, data_state, records = _state(), {"unlogged": [], "owed": {}}, []
  for stop in (5, 6, 7, 0):  # three cuts inside the window of steps 5..8
    start = int(state.step)
    loop = _loop(_plan(stop_at_step=stop), start=start, unlogged=data_state["unlogged"], owed=data_state["owed"])
    state = loop.run(state, start)
    assert int(state.step) == (stop or 10) and loop.ckpt.saved[-1][0] == int(state.step)
    data_state = loop.ckpt.saved[-1][1]
    records += loop.writer.records
    if stop:
      assert [r["loss"] for r in data_state["unlogged"]] == list(range(5, stop + 1))  # the window so far
  assert _untimed(records) == _untimed(straight.writer.records)


def test_a_signal_saves_first_and_the_resumed_run_does_what_was_due():
  straight = _loop(_plan(num_train_steps=6, log_every=3, eval_every=3))
  straight.run(_state(), 0)
  fns = FakeFns()
  fns.on_step[3] = lambda: os.kill(os.getpid(), signal.SIGTERM)
  first = _loop(_plan(num_train_steps=6, log_every=3, eval_every=3), fns)
  handler = signal.getsignal(signal.SIGTERM)
  state = first.run(_state(), 0)
  assert first.preempted and int(state.step) == 3 and first.writer.records == []
  [(step, data_state, _)] = first.ckpt.saved
  assert step == 3 and data_state["owed"] == {"log": True, "eval": True}
  assert [r["loss"] for r in data_state["unlogged"]] == [1.0, 2.0, 3.0]
  assert signal.getsignal(signal.SIGTERM) == handler  # the loop's own handler is gone again
  second = _loop(_plan(num_train_steps=6, log_every=3, eval_every=3), start=3, unlogged=data_state["unlogged"],
                 owed=data_state["owed"])
  second.run(state, 3)
  assert _untimed(second.writer.records) == _untimed(straight.writer.records)


def test_a_nonfinite_update_under_stop_refuses_to_go_on_naming_its_step_and_the_newest_checkpoint():
  loop = _loop(_plan(num_train_steps=10, log_every=4, checkpoint_every=2), FakeFns(bad={3}))
  with raises_one_line(errors.RunError, "non-finite", "step 3", "checkpoint: step 2"):
    loop.run(_state(), 0)
  assert [s for s, _, _ in loop.ckpt.saved] == [2] and loop.writer.records == []
  first = _loop(_plan(num_train_steps=10, log_every=4, checkpoint_every=8), FakeFns(bad={3}))
  with raises_one_line(errors.RunError, "step 3", "no checkpoint") as e:
    first.run(_state(), 0)
  assert "checkpoint: step" not in str(e.value)


def test_skip_leaves_nonfinite_steps_out_of_the_mean_and_counts_them(capsys):
  loop = _loop(_plan(num_train_steps=8, log_every=4, eval_every=0, checkpoint_every=100, on_nonfinite="skip"),
               FakeFns(bad={2, 7}))
  loop.run(_state(), 0)
  logged = {s: r for s, r in loop.writer.records if "loss" in r}
  assert logged[4]["loss"] == pytest.approx((1 + 3 + 4) / 3) and logged[4]["nonfinite_steps"] == 1.0
  assert logged[8]["loss"] == pytest.approx((5 + 6 + 8) / 3) and logged[8]["nonfinite_steps"] == 2.0
  assert "skipped 1 non-finite update(s) at steps [2]" in capsys.readouterr().out
  assert loop.skipped_in_a_row == 0


def test_skip_stops_a_run_after_max_skipped_steps_nonfinite_updates_in_a_row():
  plan = _plan(num_train_steps=20, log_every=2, eval_every=0, checkpoint_every=100, on_nonfinite="skip",
               max_skipped_steps=3)
  loop = _loop(plan, FakeFns(bad=set(range(3, 21))))
  with raises_one_line(errors.RunError, "4 updates", "step 6", "max_skipped_steps=3"):
    loop.run(_state(), 0)
  assert [s for s, r in loop.writer.records] == [2, 4, 6]


def test_extra_evaluations_ride_on_validation_or_keep_their_own_interval():
  calls = []
  extra = lambda params: calls.append(params) or {"extra/acc": 0.5}
  riding = _loop(_plan(num_train_steps=6, log_every=6, eval_every=3, checkpoint_every=100), extra_eval=extra)
  riding.run(_state(), 0)
  assert [(s, r.get("extra/acc")) for s, r in riding.writer.records if "val_loss" in r] == [(3, 0.5), (6, 0.5)]
  assert calls == [{"w": np.float32(1)}] * 2
  own = _loop(_plan(num_train_steps=6, log_every=6, eval_every=3, extra_eval_every=4, checkpoint_every=100),
              extra_eval=extra)
  own.run(_state(), 0)
  assert [s for s, r in own.writer.records if "extra/acc" in r] == [4, 6]
  assert all("extra/acc" not in r for _, r in own.writer.records if "val_loss" in r)
