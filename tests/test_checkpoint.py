"""Restore tells damage from refusal: another optimizer layout or a storage hiccup never moves a checkpoint aside."""

import errno
import os
import shutil

import jax
import orbax.checkpoint as ocp
import pytest
from conftest import raises_one_line
from conftest import smoke_config

from llm_jax import checkpoint as checkpoint_lib
from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import steps as steps_lib
from llm_jax import trainer
from llm_jax import workdir as workdir_lib


@pytest.fixture(name="trained", scope="module")
def trained_fixture(tmp_path_factory):
  """A workdir with checkpoints 10 and 20; tests copy it."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=30, stop_at_step=20)), workdir)
  return workdir


def _copy(trained: str, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  return workdir


def _steps(workdir: str) -> list[int]:
  reader = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir), async_save=False)
  try:
    return reader.steps()
  finally:
    reader.close()


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


@pytest.mark.slow
@pytest.mark.parametrize("override, named", [({"name": "sgd"}, "optim.name: checkpoint 'adamw' vs config 'sgd'"),
                                             ({"grad_clip_norm": 0.0}, "optim.grad_clip_norm: checkpoint 1.0")])
def test_resume_with_another_optimizer_layout_is_refused_by_name(trained, tmp_path, override, named):
  workdir = _copy(trained, tmp_path)
  metrics = _read(os.path.join(workdir, "metrics.jsonl"))
  changed = smoke_config(num_train_steps=30)
  changed.optim.update(override)
  with raises_one_line(errors.RunError, named, "--config.init_params_from="):  # the fix that keeps the weights
    trainer.train_and_evaluate(config_lib.resolve(changed), workdir)
  assert _steps(workdir) == [10, 20]
  assert not os.path.exists(os.path.join(workdir, "unusable_checkpoints"))
  assert _read(os.path.join(workdir, "metrics.jsonl")) == metrics
  # A setting that keeps the layout may change on resume.
  trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=30, stop_at_step=25, log_every=5)),
                             workdir)
  assert _steps(workdir)[-1] == 25


def _fns(**optim):
  c = smoke_config(num_train_steps=30)
  c.optim.update(optim)
  mesh, run = trainer._mesh(config_lib.resolve(c))  # pylint: disable=protected-access
  with jax.set_mesh(mesh):
    fns = steps_lib.build(*run.with_vocab(c.tokenizer.vocab_size).step_records(), mesh)
  return fns


def test_layout_mismatch_is_found_from_metadata_without_the_optim_record(trained, tmp_path):
  """Checkpoints written before meta recorded `optim`: the saved array metadata still tells."""
  workdir = _copy(trained, tmp_path)
  fns = _fns(name="sgd")
  reader = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir), async_save=False)
  try:
    with raises_one_line(checkpoint_lib.LayoutMismatch, "opt_state/1/0/count", " vs config opt_state"):
      reader.restore(fns.abstract_state, fns.state_shardings)
  finally:
    reader.close()
  assert _steps(workdir) == [10, 20]


def _damage(workdir: str, step: int) -> None:
  state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 1000:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 3)


@pytest.mark.slow
def test_all_checkpoints_damaged_stops_and_keeps_the_metrics(trained, tmp_path, capsys):
  workdir = _copy(trained, tmp_path)
  metrics = _read(os.path.join(workdir, "metrics.jsonl"))
  _damage(workdir, 10)
  _damage(workdir, 20)
  with raises_one_line(errors.CheckpointError, os.path.join(workdir, "checkpoints"), "[20, 10]",
                       os.path.join(workdir, "unusable_checkpoints")):
    trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=30)), workdir)
  assert "checkpoint at step 20 is unusable" in capsys.readouterr().out
  assert sorted(os.listdir(os.path.join(workdir, "unusable_checkpoints"))) == ["10", "20"]
  assert _read(os.path.join(workdir, "metrics.jsonl")) == metrics
  # The next invocation does not start over either.
  with raises_one_line(errors.CheckpointError, os.path.join(workdir, "unusable_checkpoints"), "10, 20",
                       "--config.restart=True"):
    trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=30)), workdir)
  assert _read(os.path.join(workdir, "metrics.jsonl")) == metrics


@pytest.fixture(name="flaky_storage")
def flaky_storage_fixture(monkeypatch):
  """Makes the manager's restore fail with EIO for the first n calls (n settable), without waiting between tries."""
  monkeypatch.setattr(checkpoint_lib, "RESTORE_BACKOFF_S", 0.0)
  original = ocp.CheckpointManager.restore
  calls = {"left": 0, "count": 0}

  def restore(self, *args, **kwargs):
    calls["count"] += 1
    if calls["left"] > 0:
      calls["left"] -= 1
      raise OSError(errno.EIO, "Input/output error")
    return original(self, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
  return calls


def test_transient_storage_error_is_retried(trained, tmp_path, flaky_storage, capsys):
  workdir = _copy(trained, tmp_path)
  fns = _fns()
  flaky_storage["left"] = 2
  reader = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir), async_save=False)
  try:
    step, _, _, _ = reader.restore(fns.abstract_state, fns.state_shardings)
  finally:
    reader.close()
  assert step == 20
  assert "retrying" in capsys.readouterr().out
  assert not os.path.exists(os.path.join(workdir, "unusable_checkpoints"))


@pytest.mark.slow
def test_persistent_storage_error_refuses_and_moves_nothing(trained, tmp_path, flaky_storage):
  workdir = _copy(trained, tmp_path)
  metrics = _read(os.path.join(workdir, "metrics.jsonl"))
  flaky_storage["left"] = 1000
  with raises_one_line(errors.CheckpointError, "step 20", f"{checkpoint_lib.RESTORE_ATTEMPTS} attempts"):
    trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=30)), workdir)
  assert flaky_storage["count"] == checkpoint_lib.RESTORE_ATTEMPTS
  flaky_storage["left"] = 0
  assert _steps(workdir) == [10, 20]
  assert not os.path.exists(os.path.join(workdir, "unusable_checkpoints"))
  assert _read(os.path.join(workdir, "metrics.jsonl")) == metrics
