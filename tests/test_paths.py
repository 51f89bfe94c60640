"""gs:// end to end without a network: a training run whose workdir, text and token store live in a fake bucket.

The fake: fsspec's in-memory filesystem registered as fsspec's "gcs" protocol (the name epath asks for). Without
TensorFlow, which this stack does not install, epath sends every gs:// path to its fsspec backend, which calls
`fsspec.filesystem("gcs")`: on a pod that is gcsfs, here it is `FakeBucket`. So each call takes the non-local
branch a real bucket takes (epath's fsspec backend; in llm_jax, `paths.is_local` is False: direct object writes,
whole-object rewrites instead of appends, ranged reads instead of memory maps, no lock), and only the bytes live
in memory. Two things stay outside the fake, by necessity:
- orbax writes arrays through tensorstore (and bucket metadata through google-cloud-storage), neither of which
  goes through fsspec; pointing them at the fake would need a GCS server. The training test therefore keeps the
  checkpoints in a local folder (`workdir.checkpoint_dir` patched) and checks everything else in the bucket.
- spawned tokeniser processes start without the in-memory registration, so the test prepares in one process.
"""

import importlib
import importlib.util
import json
import os

import numpy as np
import pytest
from conftest import REPO
from conftest import TOPICS
from conftest import raises_one_line
from conftest import smoke_config
from conftest import tensorboard_events
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from llm_jax import checkpoint as checkpoint_lib
from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import paths
from llm_jax import trainer
from llm_jax import workdir as workdir_lib
from llm_jax import writers
from llm_jax.data import sources
from llm_jax.data import store as store_lib
from llm_jax.tokenizer import train_tokenizer


class FakeBucket(MemoryFileSystem):
  """An in-memory object store answering to gs:// (its own store, so other memory:// users are untouched)."""

  protocol = ("gs", "gcs")
  root_marker = ""
  store: dict = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    return str(path).removeprefix("gs://").removeprefix("gcs://").rstrip("/")


@pytest.fixture(name="bucket")
def bucket_fixture(monkeypatch):
  """The fake registered for gs:// (and epath's cached filesystem dropped), emptied before and after."""
  registry = importlib.import_module("fsspec.registry")  # `fsspec.registry` is a read-only view of it
  monkeypatch.setitem(registry._registry, "gcs", FakeBucket)  # pylint: disable=protected-access
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  FakeBucket.store.clear()
  yield FakeBucket.store
  FakeBucket.store.clear()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def _objects(store: dict, prefix: str) -> list[str]:
  return sorted(name[len(prefix):] for name in store if name.startswith(prefix))


def _no_local_gs_folder(*directories: str) -> None:
  for directory in directories:
    assert not os.path.exists(os.path.join(directory, "gs:")), directory


def test_the_fake_takes_the_non_local_branch(bucket):
  path = paths.as_path("gs://bucket/a/b.txt")
  assert type(path).__name__ == "PosixGPath" and path._backend is epath_backend.fsspec_backend  # pylint: disable=protected-access
  paths.write_atomic("gs://bucket/a/b.txt", "one")
  paths.write_atomic("gs://bucket/a/c/d.txt", b"two")
  assert bucket["bucket/a/b.txt"].getvalue() == b"one" and not any(".tmp" in k for k in bucket)
  assert paths.glob_files("gs://bucket/a/*/*.txt") == ["gs://bucket/a/c/d.txt"]
  assert paths.glob_files("gs://bucket/*/b.t?t") == ["gs://bucket/a/b.txt"]
  with raises_one_line(errors.ConfigError, "'gs://bucket/**/*.txt'", "**"):
    paths.glob_files("gs://bucket/**/*.txt")
  assert paths.glob_files("gs://bucket/a/b.txt") == ["gs://bucket/a/b.txt"] and paths.size("gs://bucket/a/b.txt") == 3
  assert paths.absolute("gs://bucket/a") == "gs://bucket/a" and paths.absolute("x") == os.path.abspath("x")


def test_store_rows_read_by_byte_ranges_equal_the_memory_mapped_ones(bucket, tmp_path, monkeypatch):
  """The same store built locally and in the bucket: identical files, and every row read through seek + read
  from the bucket equals the row read through np.memmap (several shards, so rows cross shard boundaries)."""
  text_dir = tmp_path / "text"
  text_dir.mkdir()
  for i, text in enumerate(TOPICS[:36]):
    (text_dir / f"{i:02d}.txt").write_text(text, encoding="utf-8")
  # Relative paths: the split hashes each file's path, so a path under tmp_path (pytest-N/...) changed the number of
  # validation files from run to run, and one run in a few hundred had too few for two shards.
  monkeypatch.chdir(tmp_path)
  source = sources.TextFiles("text/*.txt", 0.3)
  assert source.paths[0] == "text/00.txt"
  assert [len(source.shards(split, 3)) for split in sources.SPLITS] == [9, 4]  # the same in every run
  tokenizer = train_tokenizer(TOPICS[:200], str(tmp_path / "spm"), model_type="bpe", vocab_size=512)
  quiet = lambda line: None
  local = store_lib.build(source, tokenizer, str(tmp_path / "store"), docs_per_shard=3, log=quiet)
  remote = store_lib.build(source, tokenizer, "gs://bucket/store", docs_per_shard=3, log=quiet)
  names = _objects(bucket, "bucket/store/")
  assert len(names) > 3 * 6 and "manifest.json" in names
  for name in names:
    with open(os.path.join(local, name), "rb") as f:
      assert bucket["bucket/store/" + name].getvalue() == f.read(), name
  local_store, remote_store = store_lib.TokenStore.open(local), store_lib.TokenStore.open(remote)
  remote_store.verify()
  for split in sources.SPLITS:
    seq_len = 37
    rows = np.arange(local_store.splits[split].num_rows(seq_len))
    assert len(local_store.manifest["splits"][split]["shards"]) >= 2
    expected, got = local_store.splits[split].rows(rows, seq_len), remote_store.splits[split].rows(rows, seq_len)
    assert isinstance(remote_store.splits[split]._shard(0)[0], store_lib.RangedTokens)  # pylint: disable=protected-access
    assert isinstance(local_store.splits[split]._shard(0)[0], np.memmap)  # pylint: disable=protected-access
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
  _no_local_gs_folder(os.getcwd(), REPO, str(tmp_path))
  # A truncated shard in the bucket: opening reads only the manifest (a stat per shard would be a request each);
  # the first read of that shard names it, in one line, and nothing is deleted.
  shard = epath.Path("gs://bucket/store/train/000001.tokens")
  shard.write_bytes(shard.read_bytes()[:-2])
  damaged = store_lib.TokenStore.open(remote)
  with raises_one_line(errors.DataError, "gs://bucket/store/train/000001.tokens"):
    damaged.splits["train"].rows(np.arange(damaged.splits["train"].num_rows(37)), 37)
  assert "bucket/store/train/000001.tokens" in bucket


@pytest.mark.slow
def test_a_gs_workdir_and_store_train_and_resume_in_the_bucket(bucket, tmp_path, monkeypatch, capsys):
  checkpoints = str(tmp_path / "checkpoints")
  monkeypatch.setattr(workdir_lib, "checkpoint_dir", lambda workdir: checkpoints)  # see the module docstring
  monkeypatch.setattr(os, "cpu_count", lambda: 1)  # see the module docstring
  for i, text in enumerate(TOPICS[:60]):
    paths.write_atomic(f"gs://bucket/text/{i:02d}.txt", text)
  config = smoke_config(num_train_steps=10, checkpoint_every=10, eval_every=10)
  config.data.corpus, config.data.text_files, config.data.store_dir = "text_files", "gs://bucket/text/*.txt", \
      "gs://bucket/stores"
  first = trainer.train_and_evaluate(config_lib.resolve(config), "gs://bucket/run")
  assert "has no file locks" in capsys.readouterr().err
  run = _objects(bucket, "bucket/run/")
  for name in ("config.json", "model.json", "run.json", "metrics.jsonl", "data_store.json"):
    assert name in run, run
  assert [n for n in run if n.startswith("tokenizer/") and n.endswith(".model")]
  [store] = [s["store"] for s in json.loads(bucket["bucket/run/data_store.json"].getvalue())["stores"]]
  assert store.startswith("gs://bucket/stores/") and f"{store[len('gs://'):]}/manifest.json" in bucket
  assert [n for n in _objects(bucket, store[len("gs://"):] + "/") if n.endswith(".tokens")]
  assert os.path.isdir(os.path.join(checkpoints, "10"))

  config.num_train_steps = 20
  second = trainer.train_and_evaluate(config_lib.resolve(config), "gs://bucket/run")
  assert "resuming from step 10" in capsys.readouterr().out and os.path.isdir(os.path.join(checkpoints, "20"))
  records = writers.read_metrics("gs://bucket/run")
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [10, 20], records
  assert train[0]["loss"] == pytest.approx(first["loss"]) and train[1]["loss"] == pytest.approx(second["loss"])
  assert json.loads(bucket["bucket/run/run.json"].getvalue())["status"] == "finished"
  event_files = [n for n in run + _objects(bucket, "bucket/run/") if n.startswith("tensorboard/")]
  local_copy = tmp_path / "events"
  shown = set()
  for name in sorted(set(event_files)):
    local_copy.write_bytes(bucket["bucket/run/" + name].getvalue())
    shown |= {e.step for e in tensorboard_events(str(local_copy)) if e.HasField("summary")}
  assert {10, 20} <= shown
  _no_local_gs_folder(os.getcwd(), REPO, str(tmp_path))


def test_metrics_on_a_bucket_are_rewritten_whole_and_truncated_on_resume(bucket):
  writer = writers.MetricWriter("gs://bucket/w")
  for step in (10, 20, 30):
    writer.write(step, {"loss": 10.0 - step / 10})
  writer.close()
  assert [r["step"] for r in writers.read_metrics("gs://bucket/w")] == [10, 20, 30]
  writer = writers.MetricWriter("gs://bucket/w", resume_step=20)  # as a run resumed from checkpoint 20
  assert [r["step"] for r in writers.read_metrics("gs://bucket/w")] == [10, 20]
  writer.write(30, {"loss": 1.5})
  writer.close()
  assert writers.read_metrics("gs://bucket/w")[-1] == {"step": 30, "loss": 1.5}
  assert not [k for k in bucket if ".tmp" in k] and len(_objects(bucket, "bucket/w/tensorboard/")) == 2


def test_gs_checkpoints_go_to_orbax_as_they_are(monkeypatch):
  assert workdir_lib.checkpoint_dir("gs://bucket/run") == "gs://bucket/run/checkpoints"
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as on a host without the package
  with raises_one_line(errors.ConfigError, "gs://bucket/run/checkpoints", "google-cloud-storage"):
    checkpoint_lib.check_reachable("gs://bucket/run/checkpoints")
  checkpoint_lib.check_reachable("/tmp/run/checkpoints")  # local: nothing to check


def test_probing_a_path_for_writing_leaves_it_as_it_was(tmp_path):
  existing = tmp_path / "report.json"
  existing.write_text("keep me", encoding="utf-8")
  paths.probe_writable(str(existing))
  assert existing.read_text(encoding="utf-8") == "keep me"  # opened for appending, never truncated
  missing = tmp_path / "new.json"
  paths.probe_writable(str(missing))
  assert not missing.exists()  # no empty file left behind
  with pytest.raises(OSError):
    paths.probe_writable(str(tmp_path / "no_such_folder" / "x.json"))
