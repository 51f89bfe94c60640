"""The training loop's honesty under interruption: throughput windows, sliced runs, signals and failed closes."""

import errno
import json
import os
import shutil
import signal

import pytest
from conftest import assert_cli_error
from conftest import raises_one_line
from conftest import run_module
from conftest import signal_at
from conftest import smoke_config

from llm_jax import checkpoint as checkpoint_lib
from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import faults
from llm_jax import launch
from llm_jax import trainer
from llm_jax import workdir as workdir_lib
from llm_jax import writers
from llm_jax.data import pipeline


def _records(workdir: str) -> list[dict]:
  return writers.read_metrics(workdir)


@pytest.mark.slow
def test_slices_write_the_records_of_an_uninterrupted_run_and_time_only_timed_steps(tmp_path, smoke_20):
  # Slices ending off the log interval (7, 19): no extra records, and the first window after the resume at
  # 19 holds only step 20, the compiling step, so it must report no throughput rather than one step's worth.
  workdir = str(tmp_path)
  for stop in (7, 19, 0):
    trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=20, stop_at_step=stop)), workdir)
  sliced, straight = _records(workdir), _records(smoke_20)
  assert [r["step"] for r in sliced] == [r["step"] for r in straight]
  assert [r.get("loss") for r in sliced] == [r.get("loss") for r in straight]
  last_train = [r for r in sliced if "loss" in r][-1]
  assert last_train["step"] == 20 and "mfu" not in last_train and "tokens_per_s" not in last_train
  assert all(0.0 < r["mfu"] < 1.0 for r in sliced if "mfu" in r)




@pytest.mark.slow
@pytest.mark.parametrize("signums,said", [((signal.SIGINT,), "interrupted (SIGINT)"),
                                          ((signal.SIGTERM, signal.SIGTERM), "preempted (SIGTERM)")])
def test_sigint_and_repeated_sigterm_stop_with_a_committed_checkpoint(tmp_path, monkeypatch, capsys, signums, said):
  signal_at(monkeypatch, 13, *signums)
  seen_at_message = []
  console = writers.console

  def watch(message: str) -> None:
    if "written, exiting" in message:  # the checkpoint must be complete on disk when we say so
      directory = os.path.join(str(tmp_path), "checkpoints")
      seen_at_message.extend(sorted(os.listdir(directory)))
    console(message)

  monkeypatch.setattr(writers, "console", watch)
  trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=30)), str(tmp_path))
  out = capsys.readouterr().out
  assert f"step     13 | {said}: checkpoint 13 written, exiting" in out
  assert "13" in seen_at_message and not [d for d in seen_at_message if "tmp" in d]
  reader = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(str(tmp_path)))
  assert reader.latest() == 13
  reader.close()
  with open(os.path.join(str(tmp_path), "run.json"), encoding="utf-8") as f:
    assert json.load(f)["status"] == "stopped"


@pytest.mark.slow
def test_sigterm_while_preparing_data_says_so(tmp_path, monkeypatch):
  prepare = pipeline.prepare_data

  def interrupted(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return prepare(*args, **kwargs)

  monkeypatch.setattr(pipeline, "prepare_data", interrupted)
  with pytest.raises(faults.Interrupted, match="SIGTERM while preparing the tokenizer and data") as caught:
    trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=10)), str(tmp_path))
  assert caught.value.exit_code == 128 + signal.SIGTERM


@pytest.mark.slow
def test_a_failing_close_still_records_how_the_run_ended(tmp_path, monkeypatch):
  close = checkpoint_lib.Checkpointer.close

  def full_disk(self):
    close(self)  # let orbax finish its own threads; then fail as a full disk would
    raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.directory, "10"))

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "close", full_disk)
  with pytest.raises(OSError) as caught:
    trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=10)), str(tmp_path))
  with open(os.path.join(str(tmp_path), "run.json"), encoding="utf-8") as f:
    assert json.load(f)["status"] == "failed"
  assert launch.storage_error_line(RuntimeError("not a storage error")) is None
  wrapped = RuntimeError("orbax: save failed")
  wrapped.__cause__ = caught.value
  line = launch.storage_error_line(wrapped)
  assert line.startswith(f"no space left writing {os.path.join(str(tmp_path), 'checkpoints', '10')} (")
  assert "MB free on that file system" in line and "\n" not in line


@pytest.mark.slow
@pytest.mark.parametrize("module,args,fragments", [
    ("train", ["--config=experiments/smoke.py", "--workdir=gs://bucket/run"], ("--workdir=gs://bucket/run", "gcsfs")),
    ("train", ["--config=experiments/smoke.py", "--workdir={tmp}/w", "--config.init_params_from=gs://bucket/base"],
     ("--config.init_params_from=gs://bucket/base", "gcsfs")),
    ("train", ["--config=experiments/smoke.py", "--workdir={tmp}/w", "--config.data.data_dir=gs://bucket/t"],
     ("--config.data.data_dir=gs://bucket/t", "local path")),
    ("generate", ["--workdir=gs://bucket/run"], ("--workdir=gs://bucket/run", "gcsfs")),
    ("convert", ["--from_hf=s3://models/gpt2", "--workdir={tmp}/w"], ("--from_hf=s3://models/gpt2", "local path")),
    ("sweep", ["--sweep=experiments/ablation_family.py", "--root=gs://bucket/sweep"],
     ("--root=gs://bucket/sweep", "local path")),
])
def test_unreachable_or_local_only_urls_are_one_line_and_nothing_is_written_locally(tmp_path, module, args,
                                                                                     fragments):
  """A gs:// workdir works (tests/test_paths.py); here gcsfs is absent, and some settings take local paths only."""
  result = run_module(f"llm_jax.{module}", *[a.format(tmp=tmp_path) for a in args],
                      process_env={"PWD": str(tmp_path)})
  assert_cli_error(result, module, *fragments)
  assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(__file__)), "gs:"))
  assert not os.path.exists(os.path.join(str(tmp_path), "w", "checkpoints"))


@pytest.mark.slow
def test_a_corrupt_run_card_is_one_line_before_training(tmp_path, pretrained):
  shutil.copytree(pretrained, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock"))  # 10 smoke steps
  run_json = os.path.join(str(tmp_path), "run.json")
  with open(run_json, "w", encoding="utf-8") as f:
    f.write('{"status": "finished", "config": {')
  with raises_one_line(errors.RunError, run_json, "line 1"):
    trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=20)), str(tmp_path))
  with open(run_json, encoding="utf-8") as f:
    assert f.read() == '{"status": "finished", "config": {'  # left as it was, for the user to look at
  assert max(r["step"] for r in writers.read_metrics(str(tmp_path))) == 10
