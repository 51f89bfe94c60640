"""The input pipeline: corpus to cached packed arrays (`prepare_data`), then grain batches for train and eval.

Batch layout across processes: global batch s holds rows [s*B, (s+1)*B) of one shuffled, endlessly
repeated stream of packed rows (B = global batch size); process p of P gets rows [p*B/P, (p+1)*B/P) of it,
so the per-process batches are disjoint and concatenate, in process order, to the single-process batch.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any

import grain
import numpy as np

from llm_jax.data.corpus import DataConfig
from llm_jax.data.corpus import load_documents
from llm_jax.data.packing import make_example
from llm_jax.data.packing import pack_documents
from llm_jax.tokenizer import Tokenizer
from llm_jax.tokenizer import TokenizerConfig
from llm_jax.tokenizer import corpus_fingerprint
from llm_jax.tokenizer import file_sha256
from llm_jax.tokenizer import get_or_train_tokenizer

# Part of the packed-array cache key: bump it whenever tokenising or packing changes.
_PACK_VERSION = "1"
_ARRAYS = ("train_tokens", "train_segment_ids", "val_tokens", "val_segment_ids")
_COUNTS = ("train_num_documents", "train_num_tokens", "train_bytes", "val_num_documents", "val_num_tokens",
           "val_bytes")


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedData:
  """Packed N x (seq_len + 1) int32 token and segment-id arrays per split, with the tokenizer and counts.

  `*_num_tokens` count tokenizer ids of the text (no bos/eos); `*_bytes` count UTF-8 bytes of the cleaned
  documents (no separators), so bits per byte = total target loss in bits / val_bytes.
  """

  tokenizer: Tokenizer
  train_tokens: np.ndarray
  train_segment_ids: np.ndarray
  val_tokens: np.ndarray
  val_segment_ids: np.ndarray
  train_num_documents: int
  train_num_tokens: int
  train_bytes: int
  val_num_documents: int
  val_num_tokens: int
  val_bytes: int

  @property
  def seq_len(self) -> int:
    return self.train_tokens.shape[1] - 1


def _save_npy(path: str, array: np.ndarray) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.save(f, array)
  os.replace(tmp, path)  # Atomic, so an interrupted run never leaves a truncated cache file.


def _tokenize_and_pack(tokenizer: Tokenizer, documents: list[str],
                       seq_len: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
  ids = tokenizer.encode_batch(documents)
  tokens, segment_ids = pack_documents(ids, seq_len, tokenizer.bos_id, tokenizer.eos_id)
  counts = (len(documents), sum(len(x) for x in ids), sum(len(d.encode("utf-8")) for d in documents))
  return tokens, segment_ids, counts


def _load_cached(prefix: str) -> tuple[dict[str, np.ndarray], dict[str, int]] | None:
  """The cached arrays and counts, or None (after one line naming the file) when any is missing or damaged.

  The cache is derived data, so damage (a disk error, a copy cut short, an edit) means rebuild, not stop.
  """
  path = f"{prefix}_counts.json"
  try:
    with open(path) as f:
      counts = json.load(f)
    if not isinstance(counts, dict) or set(_COUNTS) - set(counts):
      raise ValueError(f"missing counts {sorted(set(_COUNTS) - set(counts if isinstance(counts, dict) else {}))}")
    arrays = {}
    for name in _ARRAYS:
      path = f"{prefix}_{name}.npy"
      arrays[name] = np.load(path)
      if arrays[name].ndim != 2:
        raise ValueError(f"shape {arrays[name].shape} is not rows x (seq_len + 1)")
  except (OSError, ValueError, EOFError) as e:
    reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
    print(f"packed-data cache file {path} is unreadable ({reason}); it is derived data: rebuilding it", flush=True)
    return None
  return arrays, counts


def _load_or_pack(prefix: str, tokenizer: Tokenizer, train_docs: list[str], val_docs: list[str],
                  seq_len: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Returns the packed arrays and counts cached under `prefix`, tokenising and packing on a miss."""
  counts_path = f"{prefix}_counts.json"
  if os.path.isfile(counts_path):  # Written last, so its presence means the arrays were complete.
    cached = _load_cached(prefix)
    if cached is not None:
      return cached
  train_tokens, train_segment_ids, train_counts = _tokenize_and_pack(tokenizer, train_docs, seq_len)
  val_tokens, val_segment_ids, val_counts = _tokenize_and_pack(tokenizer, val_docs, seq_len)
  arrays = dict(zip(_ARRAYS, (train_tokens, train_segment_ids, val_tokens, val_segment_ids)))
  counts = dict(zip(_COUNTS, train_counts + val_counts))
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  for name, array in arrays.items():
    _save_npy(f"{prefix}_{name}.npy", array)
  tmp = f"{counts_path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(counts, f)
  os.replace(tmp, counts_path)
  return arrays, counts


def prepare_data(data_cfg: DataConfig, tok_cfg: TokenizerConfig, *, tokenizer_dir: str,
                 cache_dir: str) -> PreparedData:
  """Loads both splits, gets the tokenizer (cached in `tokenizer_dir`), and tokenises and packs them, reusing
  the packed arrays cached in `cache_dir`.

  The packed arrays are cached as .npy files keyed by (tokenizer file hash, seq_len, corpus text hash), so a
  restart re-reads the documents (to hash them) but does not re-tokenise.
  """
  train_docs = load_documents(data_cfg, "train")
  val_docs = load_documents(data_cfg, "validation")
  tokenizer = get_or_train_tokenizer(train_docs, tok_cfg, cache_dir=tokenizer_dir)
  seq_len = data_cfg.seq_len
  key_text = "|".join([_PACK_VERSION, file_sha256(tokenizer.path), str(seq_len), corpus_fingerprint(train_docs),
                       corpus_fingerprint(val_docs)])
  cache_key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
  prefix = os.path.join(cache_dir, cache_key)
  arrays, counts = _load_or_pack(prefix, tokenizer, train_docs, val_docs, seq_len)
  if len(arrays["val_tokens"]) == 0:
    raise ValueError(f"the validation split of data.corpus={data_cfg.corpus!r} is empty; raise "
                     "--config.data.validation_fraction or add documents")
  return PreparedData(tokenizer=tokenizer, **arrays, **counts)


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the process count "
                     f"{process_count}; change the batch size in the config")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count}); pass jax.process_index()")
  return global_batch_size // process_count


@dataclasses.dataclass(frozen=True, eq=False)
class _GatherExamples:
  """Row indices -> a batch of examples; a picklable class, not a lambda, so grain can ship it to workers."""

  tokens_NxL1: np.ndarray
  segment_ids_NxL1: np.ndarray

  def __call__(self, rows_B: np.ndarray) -> dict[str, np.ndarray]:
    return make_example(self.tokens_NxL1[rows_B], self.segment_ids_NxL1[rows_B])


def make_train_iterator(prepared: PreparedData, *, global_batch_size: int, seed: int, process_index: int,
                        process_count: int) -> grain.DatasetIterator:
  """Returns an endless, seeded iterator of this process's share of each global training batch.

  Every epoch visits each packed row once, in an order reshuffled per epoch from `seed`; batches run across
  epoch boundaries. State: `get_state()` returns grain's dict `{"next_index": s}` where s is the number of
  batches already yielded, i.e. the training step, so it is JSON-serialisable, the same on every process,
  and valid for any process count with the same global batch size and seed; `set_state` on an iterator built
  with the same arguments resumes with exactly the batches an uninterrupted iterator would yield next.
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  num_rows = len(prepared.train_tokens)
  if num_rows < global_batch_size:
    raise ValueError(f"the train split packs to {num_rows} rows of data.seq_len={prepared.seq_len}, fewer than one "
                     f"global batch of {global_batch_size}; lower the batch size or --config.data.seq_len, or use "
                     "a larger corpus")
  rows = grain.MapDataset.range(num_rows).shuffle(seed=seed % 2**32).repeat()
  # Batches of `local` consecutive rows: local batch s*P + p is process p's slice of global batch s.
  batches = rows.batch(local, drop_remainder=True)[process_index::process_count]
  batches = batches.map(_GatherExamples(prepared.train_tokens, prepared.train_segment_ids))
  read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
  return iter(batches.to_iter_dataset(read_options))


def make_eval_batches(prepared: PreparedData, *, batch_size: int, max_batches: int, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, Any]]:
  """Returns this process's slices of the first `max_batches` (all if <= 0) global validation batches.

  Rows stay in corpus order. The last batch is filled with all-padding rows (loss_mask 0), so every batch
  has the full shape and padding adds nothing to a masked loss.
  """
  local = _local_batch_size(batch_size, process_index, process_count)
  num_rows = len(prepared.val_tokens)
  if num_rows == 0:
    raise ValueError("the validation split packs to zero rows; raise --config.data.validation_fraction")
  num_batches = -(-num_rows // batch_size)
  if max_batches > 0:
    num_batches = min(num_batches, max_batches)
  padded_rows = num_batches * batch_size
  tokens = np.zeros((max(padded_rows, num_rows), prepared.val_tokens.shape[1]), dtype=np.int32)
  segment_ids = np.zeros_like(tokens)
  tokens[:num_rows], segment_ids[:num_rows] = prepared.val_tokens, prepared.val_segment_ids
  batches = []
  for step in range(num_batches):
    start = step * batch_size + process_index * local
    batches.append(make_example(tokens[start:start + local], segment_ids[start:start + local]))
  return batches
