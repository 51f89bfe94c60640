"""Never lose a run: SIGKILL and SIGTERM resume exactly, unusable checkpoints, other meshes, divergence, drift."""

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO
from conftest import SFT_ROWS
from conftest import assert_cli_error
from conftest import losses
from conftest import raises_one_line
from conftest import restored_params
from conftest import sft_config
from conftest import signal_at
from conftest import smoke_config

from llm_jax import checkpoint as checkpoint_lib
from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import faults
from llm_jax import loop as loop_lib
from llm_jax import optim
from llm_jax import paths
from llm_jax import sharding
from llm_jax import steps as steps_lib
from llm_jax import tokenizer as tokenizer_lib
from llm_jax import trainer
from llm_jax import workdir as workdir_lib
from llm_jax import writers
from llm_jax.data import pipeline

STEPS = 40


def _train_cmd(workdir: str) -> list[str]:
  return [sys.executable, "-m", "llm_jax.train", "--config=experiments/smoke.py", f"--workdir={workdir}",
          f"--config.num_train_steps={STEPS}", "--config.sample.max_length=20"]


def _start(workdir: str) -> subprocess.Popen:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(_train_cmd(workdir), cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(workdir: str, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
  path = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + timeout
  while not os.path.isdir(path):
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline, f"no checkpoint {step} after {timeout}s"
    time.sleep(0.02)


@pytest.fixture(name="uninterrupted", scope="module")
def uninterrupted_fixture(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=STEPS)), workdir)
  return workdir


def _assert_same_run(workdir: str, reference: str) -> None:
  assert losses(workdir) == losses(reference)
  for a, b in zip(jax.tree.leaves(restored_params(workdir, STEPS)),
                  jax.tree.leaves(restored_params(reference, STEPS))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigkill_at_a_random_checkpoint_then_restart_is_the_same_run(tmp_path, uninterrupted):
  workdir = str(tmp_path / "killed")
  kill_after = random.choice([10, 20, 30])
  print("SIGKILL after checkpoint", kill_after)
  proc = _start(workdir)
  _wait_for_checkpoint(workdir, kill_after, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  restarted = subprocess.run(_train_cmd(workdir), cwd=REPO, capture_output=True, text=True, check=False,
                             env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert "resuming from step" in restarted.stdout
  _assert_same_run(workdir, uninterrupted)


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_reached_and_exits_zero(tmp_path, uninterrupted):
  workdir = str(tmp_path / "preempted")
  proc = _start(workdir)
  _wait_for_checkpoint(workdir, 10, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  saved = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir), keep=100, async_save=False)
  latest = saved.latest()
  saved.close()
  if "preempted (SIGTERM)" in out:
    stopped_at = int(out.split("preempted (SIGTERM)")[0].rsplit("step", 1)[1].split("|")[0])
    assert latest == stopped_at
    assert max(r["step"] for r in writers.read_metrics(workdir)) <= stopped_at
  else:  # the signal arrived after the last step: the run simply finished
    assert latest == STEPS
  trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=STEPS)), workdir)
  _assert_same_run(workdir, uninterrupted)


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted, capsys):
  workdir = str(tmp_path / "corrupt")
  trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=STEPS, stop_at_step=30)), workdir)
  state_dir = os.path.join(workdir, "checkpoints", "30", "state")
  victims = [os.path.join(root, f) for root, _, files in os.walk(state_dir) for f in files
             if os.path.getsize(os.path.join(root, f)) > 1000]
  for victim in victims:
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 3)
  trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=STEPS)), workdir)
  out = capsys.readouterr().out
  assert "checkpoint at step 30 is unusable" in out
  assert "resuming from step 20" in out
  assert os.path.isdir(os.path.join(workdir, "unusable_checkpoints", "30"))  # kept, not deleted
  _assert_same_run(workdir, uninterrupted)


def _state_on(mesh_shape, c, cfg):
  tx, schedule = optim.make_optimizer(config_lib.resolve(c).optim, 10)
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  with jax.set_mesh(mesh):
    fns = steps_lib.build_steps(cfg, tx, schedule, mesh, seed=3, seq_len=16, accum=1)
  return fns


def _distinct_moments(state):
  """Every optimizer-state array made distinct from zero and from the params, so a restore that mixes them up shows."""
  leaves, tree = jax.tree.flatten(state.opt_state)
  moved = [x * 0.5 + 0.01 * (i + 1) if x.dtype == np.float32 and x.ndim else x for i, x in enumerate(leaves)]
  return state.replace(opt_state=tree.unflatten(moved))


@pytest.mark.parametrize("name", ["adamw", "muon", "schedule_free_adamw"])
def test_checkpoint_restores_onto_other_meshes_and_one_device(tmp_path, name):
  c = config_lib.get_config()
  c.model.update({"family": "llama", "num_layers": 2, "d_model": 64, "num_heads": 4, "num_kv_heads": 2})
  c.optim.update({"name": name, "schedule": "constant" if name == "schedule_free_adamw" else "cosine"})
  if name == "schedule_free_adamw":
    c.optim.learning_rate = 1e-3  # it has no measured default rate
  c.data.seq_len = 16
  cfg = config_lib.resolve(c).model.with_vocab(128)
  source = _state_on((2, 2, 2), c, cfg)
  with jax.set_mesh(source.batch_sharding.mesh):
    state = _distinct_moments(source.init())
  saver = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(str(tmp_path)), keep=2)
  saver.save(1, state, {"iterator": {}}, {"model": {}, "optim": dataclasses.asdict(config_lib.resolve(c).optim)})
  saver.close()
  expected = jax.device_get(state)
  expected_eval = optim.eval_params(expected.opt_state, expected.params)
  assert (expected_eval is not expected.params) == (name == "schedule_free_adamw")
  for shape in [(8, 1, 1), (1, 1, 1)]:
    target = _state_on(shape, c, cfg)
    reader = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(str(tmp_path)), keep=2)
    step, restored, _, _ = reader.restore(target.abstract_state, target.state_shardings)
    reader.close()
    reader = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(str(tmp_path)), keep=2)  # a new reader, as
    _, eval_params = reader.restore_params(target.abstract_state.params, target.state_shardings.params)  # evaluate's
    reader.close()
    assert step == 1
    assert restored.params["layers"]["attn"]["query"].sharding == target.state_shardings.params["layers"]["attn"][
        "query"]
    for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(a, b)
    # What evaluate, generate, export and init_params_from read: schedule-free's averaged x, else the params.
    for a, b in zip(jax.tree.leaves(jax.device_get(eval_params)), jax.tree.leaves(expected_eval)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


class _PoisonedIterator:
  """The real training iterator with one step's batch poisoned (NaN loss weights): divergence from outside the step."""

  def __init__(self, inner, poison_step: int):
    self.inner, self.poison_step, self.step = inner, poison_step, 0

  def __next__(self):
    batch = next(self.inner)
    self.step += 1
    if self.step == self.poison_step:
      batch = {**batch, "loss_mask": np.full_like(batch["loss_mask"], np.nan)}
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)
    self.step = state["next_index"]


@pytest.fixture(name="poison_step")
def poison_step_fixture(monkeypatch):
  """Sets which step's batch the trainer's data pipeline poisons."""
  make = pipeline.make_train_iterator
  poisoned = {}
  monkeypatch.setattr(pipeline, "make_train_iterator",
                      lambda *a, **k: _PoisonedIterator(make(*a, **k), poisoned["step"]))
  return lambda step: poisoned.update(step=step)


@pytest.mark.slow
def test_nonfinite_loss_is_skipped_and_counted(tmp_path, poison_step):
  poison_step(12)
  final = trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=20, on_nonfinite="skip")),
                                     str(tmp_path))
  assert final["nonfinite_steps"] == 1.0
  assert np.isfinite(final["loss"]) and np.isfinite(final["val_loss"])


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, poison_step):
  poison_step(15)
  with raises_one_line(errors.RunError, "non-finite", "step 15"):
    trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=20)), str(tmp_path))
  reader = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(str(tmp_path)), keep=100)
  assert reader.steps() == [10]
  reader.close()
  assert max(r["step"] for r in writers.read_metrics(str(tmp_path))) == 10


@pytest.mark.slow
def test_resuming_with_other_model_dimensions_names_the_keys(tmp_path, pretrained):
  shutil.copytree(pretrained, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock"))  # 10 smoke steps
  changed = smoke_config(num_train_steps=20)
  changed.model.d_model = 96
  changed.model.num_heads = 4
  with raises_one_line(errors.RunError, "model.d_model: checkpoint 64 vs config 96"):
    trainer.train_and_evaluate(config_lib.resolve(changed), str(tmp_path))
  # Harmless changes are allowed: more steps, other logging and eval intervals.
  trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=20, log_every=5, eval_every=5)),
                             str(tmp_path))
  assert max(r["step"] for r in writers.read_metrics(str(tmp_path))) == 20


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_refuses_to_start(tmp_path, cli):
  lock = faults.WorkdirLock(workdir_lib.lock_path(str(tmp_path)))
  lock.acquire()
  try:
    result = cli("llm_jax.train", "--config=experiments/smoke.py", f"--workdir={tmp_path}")
  finally:
    lock.release()
  assert_cli_error(result, "train", f"workdir {tmp_path} ", "running job")


_SPAWNING_SCRIPT = """
import concurrent.futures, multiprocessing, sys
from llm_jax import faults
from llm_jax import loop as loop_lib
if sys.argv[1] == "unguarded" or __name__ == "__main__":  # a spawned worker re-runs this file as __mp_main__
  faults.check_not_importing_main("the run")  # what trainer.train_and_evaluate does first
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
    try:
      print("worker returned", pool.submit(faults.check_not_importing_main, "a call in a worker").result())
    except concurrent.futures.process.BrokenProcessPool:
      print("pool broken")
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode, parent_prints, worker_says", [
    ("unguarded", "pool broken", "RunError: the run was called while a worker process imported your script: put "
                                 "the call under `if __name__ == '__main__':`"),
    ("guarded", "worker returned None", None)])
def test_a_run_started_by_a_worker_re_running_an_unguarded_script_is_refused(tmp_path, mode, parent_prints,
                                                                             worker_says):
  script = tmp_path / "script.py"
  script.write_text(_SPAWNING_SCRIPT, encoding="utf-8")
  result = subprocess.run([sys.executable, str(script), mode], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0 and result.stdout.strip() == parent_prints, result.stdout + result.stderr[-2000:]
  assert (worker_says in result.stderr) if worker_says else ("RunError" not in result.stderr), result.stderr[-2000:]


def _prepare(workdir: str) -> pipeline.PreparedData:
  c = smoke_config()
  return pipeline.prepare_data(config_lib.resolve(c).data, config_lib.resolve(c).tokenizer,
                               tokenizer_dir=os.path.join(workdir, "tokenizer"),
                               store_dir=os.path.join(workdir, "store"))


@pytest.mark.slow
def test_truncated_tokenizer_model_is_one_line_naming_the_file(tmp_path, cli):
  prepared = _prepare(str(tmp_path / "first"))
  broken = str(tmp_path / "broken.model")
  with open(prepared.tokenizer.path, "rb") as f, open(broken, "wb") as out:
    out.write(f.read()[:300])
  with raises_one_line(errors.DataError, f"tokenizer model {broken}", "delete it"):
    tokenizer_lib.get_or_train_tokenizer([], tokenizer_lib.TokenizerConfig(path=broken), str(tmp_path))
  result = cli("llm_jax.train", "--config=experiments/smoke.py", f"--workdir={tmp_path / 'run'}",
               f"--config.tokenizer.path={broken}", "--config.tokenizer.vocab_size=2048")
  assert_cli_error(result, "train", broken)


@pytest.mark.parametrize("name", ["r[1]", "r*x?"])
def test_checkpoints_in_a_folder_named_with_glob_characters_restore(tmp_path, name):
  directory = workdir_lib.checkpoint_dir(str(tmp_path / name))
  state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
  saver = checkpoint_lib.Checkpointer(directory, keep=2)
  saver.save(1, state, {"iterator": {"next_index": 1}}, {"seed": 0})
  saver.close()
  assert os.path.isfile(os.path.join(directory, "1", "state", "manifest.ocdbt"))  # orbax merged the process files
  reader = checkpoint_lib.Checkpointer(directory, keep=2)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  step, restored, data_state, _ = reader.restore(abstract, jax.tree.map(lambda _: device, state))
  reader.close()
  assert step == 1 and data_state == {"iterator": {"next_index": 1}}
  for key, value in state.items():
    np.testing.assert_array_equal(jax.device_get(restored[key]), value)


def test_a_local_path_is_never_a_glob_pattern(tmp_path):
  for folder in ("a[b]", "ab", "a*", "axe"):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "file1").write_text(folder)
  found = {os.path.relpath(p, tmp_path) for folder in ("a[b]", "a*")
           for p in map(os.fspath, paths.as_path(str(tmp_path / folder)).glob("file*"))}
  assert found == {"a[b]/file1", "a*/file1"}


def test_an_object_store_checkpoint_folder_with_glob_characters_is_refused():
  with raises_one_line(errors.ConfigError, "gs://bucket/r[1]/checkpoints", "glob character"):
    checkpoint_lib.check_reachable("gs://bucket/r[1]/checkpoints")


def _records(workdir):
  return [{k: v for k, v in r.items() if k in ("step", "loss", "val_loss", "nonfinite_steps")}
          for r in writers.read_metrics(workdir)]


@pytest.mark.slow
@pytest.mark.parametrize("during", ["the step", "the validation pass", "the last step"])
def test_sigterm_saves_before_logging_or_validating_then_resumes_the_same_record(tmp_path, monkeypatch, during):
  config = lambda: smoke_config(num_train_steps=20, log_every=5, eval_every=5, checkpoint_every=20)  # noqa: E731
  reference = str(tmp_path / "reference")
  trainer.train_and_evaluate(config_lib.resolve(config()), reference)
  stop = 20 if during == "the last step" else 10
  if during != "the validation pass":  # the signal comes while step `stop` trains; a log and validation were due
    signal_at(monkeypatch, stop, signal.SIGTERM)
  else:  # the signal comes at the first batch of step 10's validation pass, after its log line
    evaluate, calls = loop_lib.evaluate, []

    def signalling_evaluate(fns, params, batches, stop=None):
      calls.append(1)
      if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
      return evaluate(fns, params, batches, stop)
    monkeypatch.setattr(loop_lib, "evaluate", signalling_evaluate)
  workdir = str(tmp_path / "preempted")
  trainer.train_and_evaluate(config_lib.resolve(config()), workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stop)]
  first = _records(workdir)
  assert max(r["step"] for r in first) == (10 if during == "the validation pass" else stop - 5)
  assert not any(r["step"] == stop and "val_loss" in r for r in first)  # the cut validation pass wrote nothing
  with open(os.path.join(workdir, "run.json"), encoding="utf-8") as f:
    assert json.load(f)["status"] == "stopped"  # even at the last step: its log and validation are still owed
  monkeypatch.undo()
  trainer.train_and_evaluate(config_lib.resolve(config()), workdir)
  assert _records(workdir) == _records(reference)


class _Checkpoints:
  def latest(self):
    return 20


def test_skipping_non_finite_updates_stops_after_max_skipped_steps_in_a_row():
  plan = loop_lib.LoopPlan(num_train_steps=100, on_nonfinite="skip", max_skipped_steps=3)
  loop = loop_lib.Loop(plan, None, None, [], _Checkpoints(), None, {}, None)
  loop._check_skip_bound(10, [{"nonfinite": 1.0}, {"nonfinite": 1.0}, {"nonfinite": 0.0}])  # a finite one resets
  loop._check_skip_bound(20, [{"nonfinite": 1.0}, {"nonfinite": 1.0}])
  assert loop.skipped_in_a_row == 2
  with raises_one_line(errors.RunError, "3 updates", "step 30", "max_skipped_steps=3", "checkpoint: step 20"):
    loop._check_skip_bound(30, [{"nonfinite": 1.0}])


@pytest.mark.slow
def test_a_diverged_run_under_skip_gives_up(tmp_path):
  c = smoke_config(num_train_steps=30, on_nonfinite="skip", max_skipped_steps=5)
  c.optim.learning_rate = 1e30
  with raises_one_line(errors.RunError, "step 10", "max_skipped_steps=5"):
    trainer.train_and_evaluate(config_lib.resolve(c), str(tmp_path))
  with open(os.path.join(tmp_path, "run.json"), encoding="utf-8") as f:
    assert '"status": "failed"' in f.read()


def test_max_skipped_steps_is_refused_where_nothing_is_skipped():
  c = smoke_config(max_skipped_steps=3)
  with raises_one_line(errors.ConfigError, "max_skipped_steps", "on_nonfinite='stop'"):
    config_lib.check(c)
  c.on_nonfinite, c.max_skipped_steps = "skip", 0
  with raises_one_line(errors.ConfigError, "max_skipped_steps=0"):
    config_lib.check(c)


def test_rotation_keeps_the_checkpoints_other_runs_pinned_even_when_pinned_late(tmp_path):
  pins = str(tmp_path / workdir_lib.PINS_FILE)
  saver = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=2, async_save=False, pins=pins)
  state = {"w": np.zeros(3, np.float32)}
  for step in range(1, 7):
    saver.save(step, state, {}, {})
    saver.wait_until_saved()
    if step == 2:  # another run pins step 2 while this one trains
      workdir_lib.pin_checkpoint(str(tmp_path), 2, "/runs/lora")
      workdir_lib.pin_checkpoint(str(tmp_path), 2, "/runs/lora")  # idempotent
  saver.close()
  assert checkpoint_lib.read_pins(pins) == {2}
  reader = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=2, async_save=False)
  assert reader.steps() == [2, 5, 6]
  reader.close()


@pytest.mark.slow
def test_lora_adapters_survive_the_base_training_on_and_name_a_lost_base(pretrained, tmp_path):

  base, lora = str(tmp_path / "base"), str(tmp_path / "lora")
  shutil.copytree(pretrained, base, ignore=shutil.ignore_patterns(".lock", workdir_lib.PINS_FILE))  # step 10
  rows = tmp_path / "rows.jsonl"
  rows.write_text("".join(json.dumps(row) + "\n" for row in SFT_ROWS * 20))
  adapters = sft_config(base, str(rows), **{"model.lora_rank": 4, "num_train_steps": 2, "eval_every": 2,
                                             "checkpoint_every": 2})
  trainer.train_and_evaluate(config_lib.resolve(adapters), lora)
  # rotates 20 away, not 10
  trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=30, keep_checkpoints=1)), base)
  assert sorted(os.listdir(os.path.join(base, "checkpoints"))) == ["10", "30"]
  assert workdir_lib.load_model(lora).step == 2
  shutil.rmtree(os.path.join(base, "checkpoints", "10"))
  with raises_one_line(errors.CheckpointError, f"checkpoint 10 of {base}", lora, "[30]"):
    workdir_lib.load_model(lora)


_SLOW_PREPARATION = """
import sys, time
from llm_jax.data import sources, store
from llm_jax.tokenizer import load_tokenizer

class Slow(sources.Source):
  def identity(self):
    return {}

  def shards(self, split, docs_per_shard):
    return [(split, i) for i in range(2)]

  def read(self, unit, keep=None):
    time.sleep(600)
    yield "key", "text"

if __name__ == "__main__":
  store.write_shards(Slow(), load_tokenizer(sys.argv[2]), sys.argv[1], workers=4)
"""


def _children(pid: int) -> set[int]:
  found = set()
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
          found.add(int(entry))
    except (OSError, ValueError, IndexError):
      continue
  return found


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_preparation_workers_die_with_their_parent(pretrained, tmp_path, signum):
  script = tmp_path / "prepare.py"
  script.write_text(_SLOW_PREPARATION, encoding="utf-8")
  tokenizer = next(os.path.join(pretrained, "tokenizer", f) for f in os.listdir(os.path.join(pretrained, "tokenizer"))
                   if f.endswith(".model"))
  proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), tokenizer], cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  deadline = time.time() + 120
  while len(_children(proc.pid)) < 5 and time.time() < deadline:  # 4 workers and the resource tracker
    time.sleep(0.2)
  children = _children(proc.pid)
  assert len(children) >= 4, children
  time.sleep(2)  # the workers are inside their shards
  proc.send_signal(signum)
  proc.wait(timeout=60)
  deadline = time.time() + 30
  while any(map(_alive, children)) and time.time() < deadline:
    time.sleep(0.2)
  assert not any(map(_alive, children)), [c for c in children if _alive(c)]


def test_a_full_disk_refuses_the_save_in_one_line(tmp_path, monkeypatch):
  directory = str(tmp_path / "checkpoints")
  saver = checkpoint_lib.Checkpointer(directory, keep=2, async_save=False)
  state = {"w": np.zeros((256, 256), np.float32)}
  saver.save(1, state, {}, {})
  usage = shutil.disk_usage(directory)
  monkeypatch.setattr(checkpoint_lib.shutil, "disk_usage", lambda path: usage._replace(free=5 << 20))
  with raises_one_line(errors.CheckpointError, "checkpoint 2", directory, "5 MB free", "17 MB", "checkpoint 1"):
    saver.save(2, state, {}, {})
  monkeypatch.undo()

  def fail():
    raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/x/d/123\": No space left on device [source "
                     "locations='tensorstore/kvstore/file/file_key_value_store.cc:123']\nmore lines")
  monkeypatch.setattr(saver.manager, "wait_until_finished", fail)
  with raises_one_line(errors.CheckpointError, directory, "full", "(RESOURCE_EXHAUSTED: Error writing local file"):
    saver.close()
  assert sorted(os.listdir(directory)) == ["1"]
