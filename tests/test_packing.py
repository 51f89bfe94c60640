"""Tests for document packing and next-token examples, against a hand-worked case and a flat-stream reference."""

import numpy as np
import pytest
from conftest import raises_one_line

from llm_jax import errors
from llm_jax.data.packing import make_example
from llm_jax.data.packing import pack_documents

BOS, EOS = 2, 3


def test_hand_worked_example():
  tokens, segment_ids = pack_documents([[5, 6, 7], [8], [9, 10]], seq_len=4, bos_id=BOS, eos_id=EOS)
  np.testing.assert_array_equal(tokens, [[2, 5, 6, 7, 3], [2, 8, 3, 2, 9], [10, 3, 0, 0, 0]])
  np.testing.assert_array_equal(segment_ids, [[1, 1, 1, 1, 1], [1, 1, 1, 2, 2], [1, 1, 0, 0, 0]])
  assert tokens.dtype == np.int32 and segment_ids.dtype == np.int32

  row1 = make_example(tokens[1], segment_ids[1])
  np.testing.assert_array_equal(row1["inputs"], [2, 8, 3, 2])
  np.testing.assert_array_equal(row1["targets"], [8, 3, 2, 9])
  np.testing.assert_array_equal(row1["segment_ids"], [1, 1, 1, 2])
  np.testing.assert_array_equal(row1["positions"], [0, 1, 2, 0])
  np.testing.assert_array_equal(row1["loss_mask"], [1, 1, 0, 1])  # eos -> next bos is not a target

  row2 = make_example(tokens[2], segment_ids[2])
  np.testing.assert_array_equal(row2["positions"], [0, 1, 0, 0])
  np.testing.assert_array_equal(row2["loss_mask"], [1, 0, 0, 0])
  assert {k: v.dtype for k, v in row2.items()} == {
      "inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
      "loss_mask": np.float32}


def _random_docs(rng: np.random.Generator, num_docs: int) -> list[list[int]]:
  return [list(rng.integers(4, 1000, size=rng.integers(0, 40))) for _ in range(num_docs)]


@pytest.mark.parametrize("seed, seq_len", [(0, 1), (1, 7), (2, 16), (3, 63)])
def test_against_flat_stream_reference(seed, seq_len):
  rng = np.random.default_rng(seed)
  docs = _random_docs(rng, 30)
  tokens, segment_ids = pack_documents(docs, seq_len=seq_len, bos_id=BOS, eos_id=EOS)
  row_len = seq_len + 1
  # Reference: the flat stream and, per token, the document it came from (-1 for padding).
  stream = [t for doc in docs for t in [BOS, *doc, EOS]]
  owner = [i for i, doc in enumerate(docs) for _ in range(len(doc) + 2)]
  assert tokens.shape == segment_ids.shape == (-(-len(stream) // row_len), row_len)
  pad = tokens.size - len(stream)
  np.testing.assert_array_equal(tokens.reshape(-1), stream + [0] * pad)  # every token once, in order
  owner_NxL1 = np.array(owner + [-1] * pad).reshape(tokens.shape)
  assert np.all((segment_ids == 0) == (owner_NxL1 == -1))
  for row in range(len(tokens)):
    # Segments number the documents of the row 1, 2, ... in order of appearance.
    real = owner_NxL1[row][owner_NxL1[row] >= 0]
    _, first = np.unique(real, return_index=True)
    expected_ids = np.searchsorted(np.sort(first), np.arange(len(real)), side="right")
    np.testing.assert_array_equal(segment_ids[row][: len(real)], expected_ids)

  example = make_example(tokens, segment_ids)
  np.testing.assert_array_equal(example["targets"][:, :-1], example["inputs"][:, 1:])
  same_doc = (owner_NxL1[:, :-1] == owner_NxL1[:, 1:]) & (owner_NxL1[:, :-1] >= 0)
  np.testing.assert_array_equal(example["loss_mask"], same_doc.astype(np.float32))
  # Each document has len + 1 next-token pairs; only the pairs cut by a row boundary are lost.
  cut = np.count_nonzero((owner_NxL1[1:, 0] == owner_NxL1[:-1, -1]) & (owner_NxL1[1:, 0] >= 0))
  assert example["loss_mask"].sum() == sum(len(d) + 1 for d in docs) - cut
  for row in range(len(tokens)):
    position, expected = 0, []
    for i in range(seq_len):
      seg = example["segment_ids"][row, i]
      position = 0 if i == 0 or seg != example["segment_ids"][row, i - 1] else position + 1
      expected.append(position if seg else 0)
    np.testing.assert_array_equal(example["positions"][row], expected)


def test_batched_make_example_matches_rows():
  tokens, segment_ids = pack_documents(_random_docs(np.random.default_rng(7), 20), 9, BOS, EOS)
  batched = make_example(tokens, segment_ids)
  for key, value in batched.items():
    np.testing.assert_array_equal(value, np.stack([make_example(t, s)[key] for t, s in zip(tokens, segment_ids)]))
    assert value.flags.c_contiguous


def test_long_document_spans_rows_as_new_segments():
  tokens, segment_ids = pack_documents([list(range(10, 30))], seq_len=5, bos_id=BOS, eos_id=EOS)
  assert tokens.shape == (4, 6)
  np.testing.assert_array_equal(segment_ids[:3], np.ones((3, 6)))
  example = make_example(tokens, segment_ids)
  np.testing.assert_array_equal(example["positions"][:3], np.tile(np.arange(5), (3, 1)))


def test_empty_inputs():
  tokens, segment_ids = pack_documents([], seq_len=8, bos_id=BOS, eos_id=EOS)
  assert tokens.shape == segment_ids.shape == (0, 9)
  tokens, segment_ids = pack_documents([[]], seq_len=8, bos_id=BOS, eos_id=EOS)
  np.testing.assert_array_equal(tokens, [[BOS, EOS] + [0] * 7])


def test_seq_len_must_be_positive():
  with raises_one_line(errors.ConfigError, "data.seq_len=0 must be at least 1", "--config.data.seq_len="):
    pack_documents([[5]], seq_len=0, bos_id=BOS, eos_id=EOS)
