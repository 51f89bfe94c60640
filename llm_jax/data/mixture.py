"""Weighted mixtures of token stores: which component each row of the training stream comes from, and the rows.

Rows of the stream are dealt out in a fixed cycle of `CYCLE` slots in which component k holds round(w_k * CYCLE)
slots (largest remainders), spread by smooth weighted round-robin so that every prefix of the cycle is within a
row per component of its share. Row r of the stream is therefore the j-th row drawn from component k, with k and
j O(1) functions of r; component k's j-th row is row j of its own endlessly repeated, per-epoch shuffled order
(grain's index shuffle), so a small component is repeated and a large one subsampled as its weight asks. Rows all
hold seq_len + 1 tokens, so the share of rows is the share of training tokens. Validation reads the components'
validation rows in the same cycle, without shuffling, up to the point where the first of them runs out.
"""

import dataclasses
import functools
from typing import Sequence

import grain
import numpy as np

from llm_jax import errors

# Slots per cycle: weights are honoured to 1 / CYCLE; 4096 int16s and int64s per mixture.
CYCLE = 4096
# Length of the endless stream of training rows (grain datasets have a length; no run reaches this).
_ENDLESS = 1 << 62


def slot_counts(weights: Sequence[float], cycle: int = CYCLE) -> np.ndarray:
  """Slots of each component per cycle: its share of `cycle`, rounded by largest remainders (sums to `cycle`)."""
  weights_K = np.asarray(weights, dtype=np.float64)
  if len(weights_K) == 0 or np.any(weights_K <= 0):
    raise errors.ConfigError(f"mixture weights {list(weights)} must be positive; give every component weight > 0")
  exact_K = weights_K / weights_K.sum() * cycle
  counts_K = np.floor(exact_K).astype(np.int64)
  remainder_order = np.argsort(-(exact_K - counts_K), kind="stable")
  counts_K[remainder_order[:cycle - counts_K.sum()]] += 1
  if np.any(counts_K == 0):
    raise errors.ConfigError(f"mixture weights {list(weights)} give a component less than 1/{cycle} of the rows; raise "
                             "its weight or drop it")
  return counts_K


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The cycle: component of each slot, its rank among that component's slots, and slots per component."""

  component_C: np.ndarray
  rank_C: np.ndarray
  counts_K: np.ndarray

  @classmethod
  def make(cls, weights: Sequence[float], cycle: int = CYCLE) -> "Schedule":
    counts_K = slot_counts(weights, cycle)
    credit_K = np.zeros(len(counts_K), dtype=np.int64)
    component_C = np.empty(cycle, dtype=np.int16)
    rank_C = np.empty(cycle, dtype=np.int64)
    taken_K = np.zeros(len(counts_K), dtype=np.int64)
    for slot in range(cycle):  # Smooth weighted round-robin: the most owed component takes the slot.
      credit_K += counts_K
      k = int(np.argmax(credit_K))
      credit_K[k] -= cycle
      component_C[slot], rank_C[slot] = k, taken_K[k]
      taken_K[k] += 1
    return cls(component_C, rank_C, counts_K)

  def locate(self, positions_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(component k, draw j from k) of each stream position: j counts earlier positions that drew from k."""
    cycle, slot_B = np.divmod(np.asarray(positions_B, dtype=np.int64), len(self.component_C))
    k_B = self.component_C[slot_B].astype(np.int64)
    return k_B, cycle * self.counts_K[k_B] + self.rank_C[slot_B]

  def draws_before(self, position: int) -> np.ndarray:
    """How many of the first `position` stream rows each component supplied."""
    cycle, slot = divmod(position, len(self.component_C))
    return cycle * self.counts_K + np.bincount(self.component_C[:slot], minlength=len(self.counts_K))


@dataclasses.dataclass(frozen=True, eq=False)
class ConcatRows:
  """Several components' rows as one index space: component k's row i is row offsets_K[k] + i."""

  parts: tuple
  weights: tuple[float, ...]

  @functools.cached_property
  def offsets_K(self) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([p.num_rows for p in self.parts], dtype=np.int64)])

  @property
  def num_rows(self) -> int:
    return int(self.offsets_K[-1])

  @property
  def seq_len(self) -> int:
    return self.parts[0].seq_len

  def rows(self, indices_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    indices_B = np.asarray(indices_B, dtype=np.int64).reshape(-1)
    row_len = self.seq_len + 1
    tokens_BxL1 = np.zeros((len(indices_B), row_len), dtype=np.int32)
    segment_ids_BxL1 = np.zeros_like(tokens_BxL1)
    k_B = np.searchsorted(self.offsets_K, indices_B, side="right") - 1
    for k in np.unique(k_B):
      chosen = k_B == k
      tokens_BxL1[chosen], segment_ids_BxL1[chosen] = self.parts[k].rows(indices_B[chosen] - self.offsets_K[k])
    return tokens_BxL1, segment_ids_BxL1

  def component_of(self, indices_B: np.ndarray) -> np.ndarray:
    """The component each row index belongs to (for reports and tests)."""
    return np.searchsorted(self.offsets_K, np.asarray(indices_B, dtype=np.int64), side="right") - 1


@dataclasses.dataclass(frozen=True, eq=False)
class _TrainOrder:
  """Stream position -> row index of the concatenation; picklable for grain's workers."""

  schedule: Schedule
  offsets_K: np.ndarray
  orders: tuple  # Per component: grain MapDataset of its row indices, shuffled per epoch, repeated.

  def __call__(self, position: int) -> int:
    k_B, j_B = self.schedule.locate(np.array([position]))
    k, j = int(k_B[0]), int(j_B[0])
    return int(self.offsets_K[k]) + int(self.orders[k][j])


class MixtureRows(ConcatRows):
  """The training rows of a mixture: the concatenation of its components, read in `order(seed)`."""

  def order(self, seed: int) -> grain.MapDataset:
    """Row indices (into the concatenation) of the endless training stream for `seed`: a pure function of it."""
    orders = tuple(grain.MapDataset.range(part.num_rows).shuffle(seed=(seed + 7919 * k) % 2**32).repeat()
                   for k, part in enumerate(self.parts))
    return grain.MapDataset.range(_ENDLESS).map(_TrainOrder(Schedule.make(self.weights), self.offsets_K, orders))


class InterleavedRows(ConcatRows):
  """The validation rows of a mixture: position i is the draw the cycle names, in each component's own row order,
  up to the first position whose component has no rows left (so every pass reads the mixture's proportions)."""

  @functools.cached_property
  def _schedule(self) -> Schedule:
    return Schedule.make(self.weights)

  @property
  def num_rows(self) -> int:
    sizes_K = np.array([p.num_rows for p in self.parts], dtype=np.int64)
    low, high = 0, int(sizes_K.sum())  # Largest n with draws_before(n) <= sizes for every component.
    while low < high:
      mid = (low + high + 1) // 2
      low, high = (mid, high) if np.all(self._schedule.draws_before(mid) <= sizes_K) else (low, mid - 1)
    return low

  def rows(self, indices_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k_B, j_B = self._schedule.locate(np.asarray(indices_B, dtype=np.int64).reshape(-1))
    return super().rows(self.offsets_K[k_B] + j_B)
