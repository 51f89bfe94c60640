"""A start that would lose an earlier run or change its data is refused before any data is read or tokenised."""

import os
import shutil

import pytest
from conftest import losses
from conftest import raises_one_line
from conftest import smoke_config

from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import resume
from llm_jax import trainer
from llm_jax import workdir as workdir_lib


def _copy(pretrained, tmp_path):
  """The session's 10-step smoke run (tests/conftest.py), copied so it can be changed."""
  copy = tmp_path / "run"
  shutil.copytree(pretrained, copy, ignore=shutil.ignore_patterns(".lock"))
  return str(copy)


def _text_files_config(directory, **overrides):
  for i in range(6):
    (directory / f"doc{i}.txt").write_text(f"document {i} " * 40 + "\n" + "more text " * 30 + "\n")
  c = smoke_config(**overrides)
  c.data.corpus, c.data.text_files = "text_files", str(directory / "*.txt")
  return c


@pytest.mark.slow
def test_a_finished_workdir_without_its_checkpoints_is_not_restarted(pretrained, tmp_path):
  run = _copy(pretrained, tmp_path)
  shutil.rmtree(os.path.join(run, "checkpoints"))
  with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
    metrics = f.read()
  with raises_one_line(errors.RunError, run, "run.json", "'finished'", "--config.restart=True"):
    trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=20)), run)
  with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
    assert f.read() == metrics


@pytest.mark.slow
def test_metrics_without_a_checkpoint_folder_are_an_earlier_run(pretrained, tmp_path):
  run = _copy(pretrained, tmp_path)
  shutil.rmtree(os.path.join(run, "checkpoints"))
  os.remove(os.path.join(run, "run.json"))
  with raises_one_line(errors.RunError, run, "metrics.jsonl"):
    trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=20)), run)


@pytest.mark.slow
def test_restart_beside_checkpoints_is_refused(pretrained, tmp_path):
  run = _copy(pretrained, tmp_path)
  with raises_one_line(errors.RunError, "restart=True", run, "[10]", "drop --config.restart"):
    trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=20, restart=True)), run)


def test_a_run_killed_before_its_first_checkpoint_may_start_over(tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "run.json").write_text('{"status": "running"}')
  (run / "metrics.jsonl").write_text('{"step": 5, "loss": 6.0}\n')
  assert resume.read_history(smoke_config(), str(run)) is None  # no error: nothing was checkpointed


@pytest.mark.parametrize("change, fragment", [
    ({"data.validation_fraction": 0.3}, "data.validation_fraction: checkpoint 0.05 vs config 0.3"),
    ({"global_batch_size": 16}, "global_batch_size: checkpoint 8 vs config 16"),
    ({"tokenizer.vocab_size": 600}, "tokenizer.vocab_size: checkpoint 512 vs config 600"),
    ({"data.seq_len": 32, "model.max_len": 64}, "data.seq_len: checkpoint 64 vs config 32"),
])
def test_a_resume_that_changes_the_data_stream_is_refused(tmp_path, change, fragment):
  saved = _text_files_config(tmp_path)
  changed = _text_files_config(tmp_path)
  for key, value in change.items():
    section, _, name = key.rpartition(".")
    (changed[section] if section else changed)[name] = value
  meta = {"data_stream": resume.stream_record(config_lib.check(saved))}
  workdir_lib.check_data_stream(meta, resume.stream_record(config_lib.check(saved)))  # the same settings resume
  with raises_one_line(errors.RunError, fragment):  # the differing setting, as saved and as now
    workdir_lib.check_data_stream(meta, resume.stream_record(config_lib.check(changed)))


def test_a_new_corpus_file_is_refused_on_resume(tmp_path):
  c = _text_files_config(tmp_path)
  meta = {"data_stream": resume.stream_record(config_lib.check(c))}
  (tmp_path / "doc9.txt").write_text("a new document " * 50)
  with raises_one_line(errors.RunError, "data.text_files", "6 at the checkpoint", "7 now"):
    workdir_lib.check_data_stream(meta, resume.stream_record(config_lib.check(c)))


@pytest.mark.slow
def test_resume_checks_come_before_any_tokenising(pretrained, tmp_path):
  run = _copy(pretrained, tmp_path)
  store_dir = tmp_path / "fresh_store"
  for key, value, fragments in [("global_batch_size", 16, ("global_batch_size: checkpoint 8 vs config 16",)),
                                ("seed", 3, ("seed=3", "seed=0")),
                                ("optim.name", "lion", ("optim.name: checkpoint 'adamw' vs config 'lion'",))]:
    c = smoke_config(num_train_steps=20)
    c.data.store_dir = str(store_dir)
    if key == "optim.name":
      c.optim.name, c.optim.learning_rate, c.optim.b2 = "lion", 3e-4, 0.99
    else:
      c[key] = value
    with raises_one_line(errors.RunError, *fragments):
      trainer.train_and_evaluate(config_lib.resolve(c), run)
    assert not store_dir.exists(), key  # refused before the tokenizer or a store was made
  with open(os.path.join(run, "data_store.json"), encoding="utf-8") as f:
    assert str(store_dir) not in f.read()


@pytest.mark.slow
def test_a_prompt_longer_than_max_length_is_refused_before_a_store_is_built(tmp_path):
  c = smoke_config()
  c.tokenizer.model_type, c.data.store_dir = "char", str(tmp_path / "store")
  with raises_one_line(errors.ConfigError, "--config.sample.max_length=20", "prompt"):
    trainer.train_and_evaluate(config_lib.resolve(c), str(tmp_path / "run"))
  assert os.listdir(tmp_path / "store") == ["tokenizers"]  # the tokenizer was trained, no store tokenised


@pytest.mark.slow
def test_restart_starts_over_where_the_checkpoints_are_gone(pretrained, tmp_path):
  run = _copy(pretrained, tmp_path)
  shutil.rmtree(os.path.join(run, "checkpoints"))
  trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=10, restart=True)), run)
  assert os.listdir(os.path.join(run, "checkpoints")) == ["10"]
  assert losses(run) == losses(pretrained)  # the same 10 seeded steps again, metrics.jsonl replaced, not appended
