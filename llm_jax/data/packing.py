"""Packing tokenised documents into fixed-length rows with segment ids, and rows into next-token examples.

Shapes: N rows, L = seq_len model positions, L1 = L + 1 tokens per packed row (inputs and targets overlap
by all but one token).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from llm_jax import batch as batch_lib
from llm_jax import errors

PAD_ID = 0


def pack_documents(token_docs: Sequence[Sequence[int]], seq_len: int, bos_id: int,
                   eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates [bos] + ids + [eos] per document and cuts the stream into rows of seq_len + 1 tokens.

  bos_id < 0 means the tokenizer has no beginning-of-text token (GPT-2's): documents are then ids + [eos].

  Returns (tokens_NxL1, segment_ids_NxL1), both int32. Segment ids number the documents within each row
  from 1; a document cut by a row boundary continues in the next row as that row's first segment. The last
  row is padded with token PAD_ID and segment 0.
  """
  if seq_len < 1:
    raise errors.ConfigError(f"data.seq_len={seq_len} must be at least 1; pass e.g. --config.data.seq_len=128")
  row_len = seq_len + 1
  has_bos = bos_id >= 0
  lengths = np.array([len(doc) + 1 + has_bos for doc in token_docs], dtype=np.int64)
  total = int(lengths.sum())
  num_rows = -(-total // row_len)
  ends = np.cumsum(lengths)
  starts = ends - lengths
  # Slot of each token in the flat stream; padding keeps document index -1.
  tokens = np.full(num_rows * row_len, PAD_ID, dtype=np.int32)
  doc_index = np.full(num_rows * row_len, -1, dtype=np.int64)
  doc_index[:total] = np.repeat(np.arange(len(lengths)), lengths)
  is_body = np.ones(total, dtype=bool)
  if has_bos:
    is_body[starts] = False
  is_body[ends - 1] = False
  if total:
    if has_bos:
      tokens[starts] = bos_id
    tokens[ends - 1] = eos_id
    bodies = [np.asarray(doc, dtype=np.int32).reshape(-1) for doc in token_docs]
    tokens[:total][is_body] = np.concatenate(bodies)
  tokens_NxL1 = tokens.reshape(num_rows, row_len)
  doc_index_NxL1 = doc_index.reshape(num_rows, row_len)
  new_segment_NxL1 = np.ones((num_rows, row_len), dtype=np.int32)
  new_segment_NxL1[:, 1:] = doc_index_NxL1[:, 1:] != doc_index_NxL1[:, :-1]
  segment_ids_NxL1 = np.where(doc_index_NxL1 >= 0, np.cumsum(new_segment_NxL1, axis=1), 0).astype(np.int32)
  return tokens_NxL1, segment_ids_NxL1


def make_example(tokens_L1: np.ndarray, segment_ids_L1: np.ndarray,
                 weights_L1: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Turns packed rows (shape (..., L1)) into model inputs with next-token targets, each of shape (..., L).

  `positions` restart at 0 in each segment (0 on padding); `loss_mask` is 1.0 where input and target belong
  to the same document, so no loss is taken across documents or on padding, times the target token's weight
  in `weights_L1` when given (supervised fine-tuning: 0 on prompt tokens).
  """
  tokens_L1 = np.asarray(tokens_L1, dtype=np.int32)
  segment_ids_L1 = np.asarray(segment_ids_L1, dtype=np.int32)
  segment_ids_L = segment_ids_L1[..., :-1]
  length = segment_ids_L.shape[-1]
  index_L = np.arange(length, dtype=np.int32)
  is_start_L = np.ones(segment_ids_L.shape, dtype=bool)
  is_start_L[..., 1:] = segment_ids_L[..., 1:] != segment_ids_L[..., :-1]
  segment_start_L = np.maximum.accumulate(np.where(is_start_L, index_L, 0), axis=-1)
  same_document_L = (segment_ids_L == segment_ids_L1[..., 1:]) & (segment_ids_L > 0)
  return batch_lib.make(
      inputs=tokens_L1[..., :-1],
      targets=tokens_L1[..., 1:],
      segment_ids=segment_ids_L,
      positions=np.where(segment_ids_L > 0, index_L - segment_start_L, 0),
      loss_mask=same_document_L if weights_L1 is None else same_document_L * np.asarray(weights_L1)[..., 1:],
  )
