"""Tests for prepare_data and its token store, and for the train iterator and eval batches across processes."""

import json
import os
import sys
import types
from pydoc_data.topics import topics

import ml_collections
import numpy as np
import pytest
from conftest import raises_one_line

from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax.data import pipeline
from llm_jax.data import store as store_lib
from llm_jax.data.corpus import load_documents
from llm_jax.data.pipeline import PackedRows
from llm_jax.data.pipeline import PreparedData
from llm_jax.data.pipeline import make_eval_batches
from llm_jax.data.pipeline import make_train_iterator

KEYS = {"inputs", "targets", "segment_ids", "positions", "loss_mask"}


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> pipeline.PreparedData:
  return pipeline.prepare_data(config_lib.resolve(config).data, config_lib.resolve(config).tokenizer,
                               tokenizer_dir=os.path.join(workdir, "tokenizer"),
                               store_dir=os.path.join(workdir, "stores"))


def _config(data_dir: str, **data) -> ml_collections.ConfigDict:
  c = config_lib.get_config()
  c.data.update({"data_dir": data_dir, **data})
  c.sample.max_length = 16  # fits the shortest seq_len these tests use
  return c


def _synthetic(num_train: int, num_val: int, seq_len: int = 6) -> PreparedData:
  """Row i holds token i everywhere, so a batch's inputs[:, 0] names the rows it was built from."""
  def rows(n):
    return np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len + 1, axis=1), np.ones((n, seq_len + 1), np.int32)

  train_tokens, train_segment_ids = rows(num_train)
  val_tokens, val_segment_ids = rows(num_val)
  return PreparedData(None, PackedRows(train_tokens, train_segment_ids), PackedRows(val_tokens, val_segment_ids),
                      num_train, 0, 0, num_val, 0, 0)


def _all_rows(rows) -> tuple[np.ndarray, np.ndarray]:
  return rows.rows(np.arange(rows.num_rows))


def _take(iterator, n: int) -> list[np.ndarray]:
  return [next(iterator)["inputs"][:, 0].copy() for _ in range(n)]


def test_prepare_text_files_round_trips_and_caches(tmp_path, monkeypatch):
  for i, (name, text) in enumerate(sorted(topics.items())[:120]):
    (tmp_path / f"{i:03d}-{name}.txt").write_text(text, encoding="utf-8")
  cfg = _config("", corpus="text_files", text_files=f"{tmp_path}/*.txt", seq_len=64)
  cfg.tokenizer.vocab_size = 512
  workdir = str(tmp_path / "work")
  prepared = prepare_data(cfg, workdir)
  tokenizer = prepared.tokenizer
  for split, (tokens, segment_ids) in [("train", _all_rows(prepared.train)),
                                       ("validation", _all_rows(prepared.val))]:
    docs = load_documents(config_lib.resolve(cfg).data, split)
    ids = [tokenizer.encode(d) for d in docs]
    stream = [t for x in ids for t in [tokenizer.bos_id, *x, tokenizer.eos_id]]
    assert tokens.shape[1] == 65 and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens[segment_ids > 0], stream)
    assert [tokenizer.decode(x) for x in ids] == docs
    prefix = "train" if split == "train" else "val"
    assert getattr(prepared, f"{prefix}_num_documents") == len(docs)
    assert getattr(prepared, f"{prefix}_num_tokens") == sum(len(x) for x in ids)
    assert getattr(prepared, f"{prefix}_bytes") == sum(len(d.encode("utf-8")) for d in docs)

  def fail(*args, **kwargs):
    raise AssertionError("re-read or re-tokenised although the token store is there")

  # A restart and another seq_len read the same store: no text is read and nothing is tokenised.
  monkeypatch.setattr(store_lib, "_write_shard", fail)
  monkeypatch.setattr(pipeline.store_lib.Source, "documents", fail)
  again = prepare_data(cfg, workdir)
  for a, b in zip(_all_rows(again.train) + _all_rows(again.val), _all_rows(prepared.train) + _all_rows(prepared.val)):
    np.testing.assert_array_equal(a, b)
  assert again.val_bytes == prepared.val_bytes and again.tokenizer.path == tokenizer.path
  other_seq_len = ml_collections.ConfigDict(cfg.to_dict())
  other_seq_len.data.seq_len = 32
  assert prepare_data(other_seq_len, workdir).store_paths == prepared.store_paths
  assert len(os.listdir(os.path.join(workdir, "tokenizer"))) == 1
  assert not [f for _, _, files in os.walk(os.path.join(workdir, "stores")) for f in files if ".tmp" in f]


def test_prepare_refuses_to_run_in_a_worker_re_running_the_script(tmp_path, monkeypatch):
  # What multiprocessing's spawn does while a worker re-runs the parent's script: the script is '__mp_main__' and
  # not yet '__main__' (tests/test_faults.py checks this against a real spawned worker).
  monkeypatch.setitem(sys.modules, "__mp_main__", types.ModuleType("__mp_main__"))
  with raises_one_line(errors.RunError, "pipeline.prepare_data", "if __name__ == '__main__':"):  # the fix is the point
    prepare_data(_config(str(tmp_path / "tfds")), str(tmp_path))
  assert not os.path.exists(tmp_path / "stores")  # refused before any lock or file


@pytest.mark.slow
def test_prepare_sotu(tmp_path):
  prepared = prepare_data(_config(str(tmp_path / "tfds")), str(tmp_path / "work"))
  assert (prepared.train_num_documents, prepared.val_num_documents) == (238, 11)
  assert prepared.tokenizer.vocab_size == 2048 and prepared.seq_len == 128
  # English at vocab 2048 packs about 3.6 bytes per token; a broken tokenizer would be near 1.
  assert 3.2 < prepared.train_bytes / prepared.train_num_tokens < 4.0
  assert prepared.train.num_rows == -(-(prepared.train_num_tokens + 2 * 238) // 129)
  assert prepared.val.num_rows > 0


def test_same_seed_same_batches_other_seed_other_batches():
  data = _synthetic(40, 4)
  first = _take(make_train_iterator(data, global_batch_size=8, seed=3, process_index=0, process_count=1), 12)
  second = _take(make_train_iterator(data, global_batch_size=8, seed=3, process_index=0, process_count=1), 12)
  other = _take(make_train_iterator(data, global_batch_size=8, seed=4, process_index=0, process_count=1), 12)
  np.testing.assert_array_equal(first, second)
  assert not np.array_equal(first, other)


def test_epochs_cover_every_row_and_reshuffle():
  data = _synthetic(24, 4)
  rows = np.concatenate(_take(make_train_iterator(data, global_batch_size=8, seed=0, process_index=0,
                                                  process_count=1), 9))
  epochs = rows.reshape(3, 24)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(24))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[0], np.arange(24))


def test_batches_are_examples():
  data = _synthetic(16, 4)
  batch = next(make_train_iterator(data, global_batch_size=4, seed=0, process_index=0, process_count=1))
  assert set(batch) == KEYS
  assert {k: v.shape for k, v in batch.items()} == {k: (4, 6) for k in KEYS}
  np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(6), (4, 1)))


def test_state_resumes_exactly():
  data = _synthetic(20, 4)
  reference = _take(make_train_iterator(data, global_batch_size=6, seed=1, process_index=0, process_count=1), 12)
  iterator = make_train_iterator(data, global_batch_size=6, seed=1, process_index=0, process_count=1)
  _take(iterator, 5)
  state = json.loads(json.dumps(iterator.get_state()))
  _take(iterator, 2)  # Progress after the save must not leak into the restored iterator.
  restored = make_train_iterator(data, global_batch_size=6, seed=1, process_index=0, process_count=1)
  restored.set_state(state)
  np.testing.assert_array_equal(_take(restored, 7), reference[5:])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(process_count):
  data = _synthetic(50, 4)
  whole = _take(make_train_iterator(data, global_batch_size=8, seed=0, process_index=0, process_count=1), 10)
  parts = [_take(make_train_iterator(data, global_batch_size=8, seed=0, process_index=p,
                                     process_count=process_count), 10) for p in range(process_count)]
  for step in range(10):
    np.testing.assert_array_equal(np.concatenate([part[step] for part in parts]), whole[step])
  # The state is the step count, so a single-process checkpoint restores into a multi-process run.
  single = make_train_iterator(data, global_batch_size=8, seed=0, process_index=0, process_count=1)
  _take(single, 4)
  moved = make_train_iterator(data, global_batch_size=8, seed=0, process_index=1, process_count=process_count)
  moved.set_state(single.get_state())
  np.testing.assert_array_equal(_take(moved, 1)[0], parts[1][4])


def test_train_iterator_errors():
  data = _synthetic(5, 4)
  with pytest.raises(ValueError, match="fewer than one global batch of 8; lower the batch size"):
    make_train_iterator(data, global_batch_size=8, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="must be a positive multiple of the process count 3"):
    make_train_iterator(data, global_batch_size=4, seed=0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="process_index=2 is outside"):
    make_train_iterator(data, global_batch_size=4, seed=0, process_index=2, process_count=2)


def test_eval_batches():
  data = _synthetic(8, 10)
  batches = make_eval_batches(data, batch_size=4, max_batches=0)
  assert len(batches) == 3
  assert all({k: v.shape for k, v in b.items()} == {k: (4, 6) for k in KEYS} for b in batches)
  np.testing.assert_array_equal(np.concatenate([b["inputs"][:, 0] for b in batches])[:10], np.arange(10))
  np.testing.assert_array_equal(batches[2]["loss_mask"].sum(axis=1), [6, 6, 0, 0])  # padded rows count nothing
  assert len(make_eval_batches(data, batch_size=4, max_batches=2)) == 2
  halves = [make_eval_batches(data, batch_size=4, max_batches=0, process_index=p, process_count=2) for p in (0, 1)]
  for step, batch in enumerate(batches):
    for key in KEYS:
      np.testing.assert_array_equal(np.concatenate([halves[0][step][key], halves[1][step][key]]), batch[key])


def test_eval_batches_need_validation_rows():
  with pytest.raises(ValueError, match="validation split packs to zero rows"):
    make_eval_batches(_synthetic(8, 0), batch_size=4, max_batches=1)
