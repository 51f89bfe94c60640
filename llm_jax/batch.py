"""The training batch: its keys, dtypes and shapes, written once for the data pipeline, the steps and the benches.

Every array is (B, L): B sequences of L = seq_len model positions.
  inputs       int32    token ids the model reads
  targets      int32    the next token at each position
  segment_ids  int32    document number within the row (1, 2, ...; 0 is padding): attention never crosses it
  positions    int32    position within the document (restarts at 0 in each segment)
  loss_mask    float32  1.0 where the target counts towards the loss, else 0.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

import numpy as np

if TYPE_CHECKING:  # JAX only for type hints and `abstract`: the data workers that import this never load it.
  import jax

Batch = dict[str, Any]

DTYPES: dict[str, type] = {
    "inputs": np.int32,
    "targets": np.int32,
    "segment_ids": np.int32,
    "positions": np.int32,
    "loss_mask": np.float32,
}
KEYS = tuple(DTYPES)


def make(**arrays: np.ndarray) -> dict[str, np.ndarray]:
  """A batch from exactly the schema's arrays, cast to its dtypes and made contiguous."""
  if set(arrays) != set(KEYS):
    raise ValueError(f"a batch has the keys {KEYS}, got {tuple(sorted(arrays))}")
  return {k: np.ascontiguousarray(arrays[k], dtype=DTYPES[k]) for k in KEYS}


def abstract(batch_size: int, seq_len: int, sharding: jax.sharding.Sharding | None = None
             ) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of a (batch_size, seq_len) batch, for compiling a step without data."""
  import jax  # pylint: disable=import-outside-toplevel
  return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=sharding) for k, dtype in DTYPES.items()}


def synthetic(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Uniformly random tokens, one document per row, every target counted: data that costs nothing to make."""
  rng = np.random.default_rng(seed)
  shape = (batch_size, seq_len)
  return make(inputs=rng.integers(0, vocab_size, shape), targets=rng.integers(0, vocab_size, shape),
              segment_ids=np.ones(shape), positions=np.broadcast_to(np.arange(seq_len), shape),
              loss_mask=np.ones(shape))
