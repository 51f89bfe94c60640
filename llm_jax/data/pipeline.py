"""The input pipeline: corpus to a shared token store (`prepare_data`) or SFT rows held in memory (`prepare_sft`),
then grain batches for train and eval.

Batch layout across processes: global batch s holds rows [s*B, (s+1)*B) of one shuffled, endlessly
repeated stream of packed rows (B = global batch size); process p of P gets rows [p*B/P, (p+1)*B/P) of it,
so the per-process batches are disjoint and concatenate, in process order, to the single-process batch.
"""

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Sequence

import grain
import numpy as np

from llm_jax import chat
from llm_jax import errors
from llm_jax import paths
from llm_jax.data import mixture
from llm_jax.data import sft as sft_lib
from llm_jax.data import store as store_lib
from llm_jax.data.corpus import Component
from llm_jax.data.corpus import DataConfig
from llm_jax.data.corpus import components
from llm_jax.data.corpus import make_source
from llm_jax.data.corpus import store_dir as default_store_dir
from llm_jax.data.packing import make_example
from llm_jax.data.sources import Source
from llm_jax.data.split import is_validation
from llm_jax.tokenizer import MAX_TRAIN_CHARS
from llm_jax.tokenizer import TokenizerConfig
from llm_jax.tokenizer import get_or_train_streaming
from llm_jax.tokenizer import load_tokenizer

# The tokenizer reads all train documents of inputs up to this many times tokenizer.MAX_TRAIN_CHARS bytes, and a
# hash-sampled share of about that many characters of larger ones.
_TOKENIZER_SAMPLE_RATIO = 16


@dataclasses.dataclass(frozen=True, eq=False)
class PackedRows:
  """Rows held in memory as N x L1 arrays (tests and small data, SFT sets with their per-token loss weights); the
  same interface as `StoreRows`."""

  tokens_NxL1: np.ndarray
  segment_ids_NxL1: np.ndarray
  weights_NxL1: np.ndarray | None = None

  @property
  def num_rows(self) -> int:
    return len(self.tokens_NxL1)

  @property
  def seq_len(self) -> int:
    return self.tokens_NxL1.shape[1] - 1

  def rows(self, indices_B: np.ndarray) -> tuple[np.ndarray, ...]:
    """(tokens, segment ids) of the rows, and their weights when the rows carry them."""
    picked = (self.tokens_NxL1[indices_B], self.segment_ids_NxL1[indices_B])
    return picked if self.weights_NxL1 is None else (*picked, self.weights_NxL1[indices_B])


@dataclasses.dataclass(frozen=True, eq=False)
class StoreRows:
  """One split of a token store cut into rows of seq_len + 1 tokens, read from its memory-mapped shards."""

  split: store_lib.SplitStore
  seq_len: int

  @property
  def num_rows(self) -> int:
    return self.split.num_rows(self.seq_len)

  def rows(self, indices_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.split.rows(indices_B, self.seq_len)


Rows = PackedRows | StoreRows | mixture.ConcatRows


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedData:
  """The tokenizer, the packed rows of each split and their counts; `store_paths` name the token stores read (one
  per source: a mixture has several).

  `*_num_tokens` count tokenizer ids of the text (no bos/eos); `*_bytes` count UTF-8 bytes of the cleaned
  documents (no separators), so bits per byte = total target loss in bits / val_bytes.
  """

  tokenizer: Any
  train: Rows
  val: Rows
  train_num_documents: int
  train_num_tokens: int
  train_bytes: int
  val_num_documents: int
  val_num_tokens: int
  val_bytes: int
  store_paths: tuple[str, ...] = ()

  @property
  def seq_len(self) -> int:
    return self.train.seq_len


def _no_barrier(name: str) -> None:
  del name


@contextlib.contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
  """An flock on a local store. An object store has none, and takes no lock: two runs building the same store
  at once each write the same bytes (shards are a function of the source and tokenizer), so the cost is the
  duplicated work, not a damaged store."""
  if not paths.is_local(lock_path):
    yield
    return
  os.makedirs(os.path.dirname(lock_path), exist_ok=True)
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def _copy_into(path: str, directory: str) -> str:
  """Copies the tokenizer file into the workdir (atomically), so the run stays self-contained."""
  target = os.path.join(directory, os.path.basename(path))
  if not paths.as_path(target).exists():
    paths.makedirs(directory)
    paths.write_atomic(target, paths.as_path(path).read_bytes())
  return target


def prepare_data(data_cfg: DataConfig, tok_cfg: TokenizerConfig, *, tokenizer_dir: str = "",
                 store_dir: str = "", process_index: int = 0, process_count: int = 1,
                 barrier: Callable[[str], None] = _no_barrier, log: Callable[[str], None] = print,
                 check_tokenizer: Callable[[Any], None] | None = None) -> PreparedData:
  """Gets the tokenizer and the token store of each source (one, or a mixture's components), building what is
  missing.

  Both are cached under `store_dir` (data.store_dir when empty) and keyed by a cheap identity of the input
  (paths, sizes, mtimes; dataset versions), so a restart reads no text. With several processes, process 0
  trains the tokenizer, process p tokenises shards i = p (mod process_count), and process 0 writes the
  manifest; `barrier(name)` must wait for every process (multihost_utils.sync_global_devices). The tokenizer
  is copied into `tokenizer_dir` when given. `check_tokenizer(tokenizer)` runs before any document is tokenised
  (a caller's checks that need the tokenizer: a missing store may take hours).
  """
  from llm_jax import faults  # pylint: disable=import-outside-toplevel  # grain's workers import this module, not JAX
  faults.check_not_importing_main("pipeline.prepare_data")  # else such a worker waits on this process's store lock
  seq_len = data_cfg.seq_len
  if seq_len < 1:  # Checked before anything is read: the store itself does not depend on seq_len.
    raise errors.ConfigError(f"data.seq_len={seq_len} must be at least 1; pass e.g. --config.data.seq_len=128")
  root = store_dir or default_store_dir(data_cfg)
  parts = components(data_cfg)
  # Every source is checked before any text is read.
  sources = [make_source(part.data, f"data.mixture.{part.name}" if part.name else "data") for part in parts]
  tokenizer = _get_tokenizer(parts, sources, tok_cfg, root, process_index, barrier, log)
  if tokenizer_dir and not tok_cfg.path:
    tokenizer = type(tokenizer).load(_copy_into(tokenizer.path, tokenizer_dir))
  if check_tokenizer is not None:
    check_tokenizer(tokenizer)
  stores = []
  for part, source in zip(parts, sources):
    what = f"data.corpus={part.data.corpus!r}" + (f" (mixture component {part.name!r})" if part.name else "")
    stores.append(_get_store(source, tokenizer, root, what, process_index, process_count, barrier, log))
  counts = {split: [store.counts(split) for store in stores] for split in ("train", "validation")}
  for part, val in zip(parts, counts["validation"]):
    if val["documents"] == 0:
      raise errors.ConfigError(f"the validation split of data.corpus={part.data.corpus!r}"
                       + (f" (mixture component {part.name!r})" if part.name else "")
                       + " is empty; raise --config.data.validation_fraction or add documents")
  if len(stores) == 1:
    train, val = (StoreRows(stores[0].splits[split], seq_len) for split in ("train", "validation"))
  else:
    weights = tuple(part.weight for part in parts)
    train = mixture.MixtureRows(tuple(StoreRows(s.splits["train"], seq_len) for s in stores), weights)
    val = mixture.InterleavedRows(tuple(StoreRows(s.splits["validation"], seq_len) for s in stores), weights)
  total = {split: {key: sum(c[key] for c in counts[split]) for key in ("documents", "num_tokens", "bytes")}
           for split in counts}
  return PreparedData(tokenizer, train, val, total["train"]["documents"], total["train"]["num_tokens"],
                      total["train"]["bytes"], total["validation"]["documents"],
                      total["validation"]["num_tokens"], total["validation"]["bytes"],
                      store_paths=tuple(store.path for store in stores))


def _tokenizer_sample(parts: Sequence[Component],
                      sources: Sequence[Source]) -> tuple[Callable[[], Iterator[str]], bool]:
  """The documents the tokenizer trains on: every train document of small inputs; of larger ones a share, picked
  by a stable hash of the document's key, of about weight x _TOKENIZER_SAMPLE_RATIO x MAX_TRAIN_CHARS bytes per
  source (so a mixture's sample follows its weights, and inputs of unknown size are read whole)."""
  keeps = []
  for part, source in zip(parts, sources):
    input_bytes = source.input_bytes("train") or 0
    rate = part.weight * _TOKENIZER_SAMPLE_RATIO * MAX_TRAIN_CHARS / input_bytes if input_bytes else 1.0
    keeps.append(functools.partial(_keep_for_tokenizer, rate=rate) if rate < 1.0 else None)

  def documents() -> Iterator[str]:
    for source, keep in zip(sources, keeps):
      yield from (text for _, text in source.documents("train", keep))
  return documents, any(keeps)


def _keep_for_tokenizer(key: str, rate: float) -> bool:
  return is_validation(f"tokenizer:{key}", rate)


def _get_tokenizer(parts: Sequence[Component], sources: Sequence[Source], tok_cfg: TokenizerConfig, root: str,
                   process_index: int, barrier: Callable[[str], None], log: Callable[[str], None]) -> Any:
  """Process 0 loads or trains the tokenizer (cached under root/tokenizers, keyed by the sources and weights);
  the others then load it."""
  identity = sources[0].identity() if len(sources) == 1 else [
      {"name": p.name, "weight": p.weight, "source": s.identity()} for p, s in zip(parts, sources)]
  corpus_key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
  sample, sampled = _tokenizer_sample(parts, sources)
  announced = []

  def train_documents() -> Iterator[str]:  # Called once per streaming pass (count, then take): say so once.
    if not announced:
      log(f"reading {'a sample' if sampled else 'all'} of the train split for the tokenizer's training text")
      announced.append(True)
    return sample()

  get = lambda: get_or_train_streaming(train_documents, corpus_key, tok_cfg, os.path.join(root, "tokenizers"))
  tokenizer = get() if process_index == 0 else None
  barrier("llm_jax:tokenizer")
  return get() if tokenizer is None else tokenizer


def _get_store(source: Source, tokenizer: Any, root: str, what: str, process_index: int, process_count: int,
               barrier: Callable[[str], None], log: Callable[[str], None]) -> store_lib.TokenStore:
  """Opens the token store of (source, tokenizer) under `root`, tokenising it first if it is missing."""
  path = os.path.join(root, store_lib.fingerprint(source.identity(), paths.file_sha256(tokenizer.path),
                                                  store_lib.DOCS_PER_SHARD))
  manifest = os.path.join(path, store_lib.MANIFEST)
  # Runs of a sweep starting together on one machine take turns: the first builds, the others then read.
  building = process_count == 1 and not paths.as_path(manifest).exists()
  with _exclusive(f"{path}.lock") if building else contextlib.nullcontext():
    if not paths.as_path(manifest).exists():
      log(f"tokenising {what} into the token store {path}")
      store_lib.write_shards(source, tokenizer, path, process_index=process_index, process_count=process_count,
                             workers=os.cpu_count() or 1, log=log)
    barrier(f"llm_jax:store_shards:{os.path.basename(path)}")
    if process_index == 0 and not paths.as_path(manifest).exists():
      store_lib.write_manifest(source, tokenizer, path)
  barrier(f"llm_jax:store_manifest:{os.path.basename(path)}")
  return store_lib.TokenStore.open(path)


def prepare_sft(data_cfg: DataConfig, tok_cfg: TokenizerConfig) -> PreparedData:
  """The SFT rows of data.sft_files, rendered with the tokenizer's chat template (else `chat.DEFAULT_TEMPLATE`),
  split by row and packed whole in memory with their loss weights (no token store: SFT sets are small).

  Needs an existing tokenizer (tokenizer.path, which init_params_from sets): fine-tuning keeps the model's own.
  """
  tokenizer = load_tokenizer(os.path.expanduser(tok_cfg.path))
  examples = sft_lib.load_examples(data_cfg.sft_files, tokenizer, chat.template_for(tokenizer.path),
                                   train_on_prompt=data_cfg.train_on_prompt, seq_len=data_cfg.seq_len)
  splits = sft_lib.split_examples(examples, data_cfg.validation_fraction)
  rows = [PackedRows(*sft_lib.pack_examples(split, data_cfg.seq_len)) for split in splits]
  counts = [(len(split), sum(len(e.tokens) for e in split)) for split in splits]
  # Bytes are not counted for SFT rows (bits per byte is a pre-training measure): 0.
  return PreparedData(tokenizer, rows[0], rows[1], counts[0][0], counts[0][1], 0, counts[1][0], counts[1][1], 0)


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise errors.ConfigError(f"global batch size {global_batch_size} must be a positive multiple of the process count "
                             f"{process_count}; change the batch size in the config")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count}); pass jax.process_index()")
  return global_batch_size // process_count


@dataclasses.dataclass(frozen=True, eq=False)
class _GatherExamples:
  """Row indices -> a batch of examples; a picklable class, not a lambda, so grain can ship it to workers."""

  rows: Rows

  def __call__(self, rows_B: np.ndarray) -> dict[str, np.ndarray]:
    return make_example(*self.rows.rows(rows_B))


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
  num_rows = prepared.train.num_rows
  if num_rows < global_batch_size:
    raise errors.DataError(f"the train split packs to {num_rows} rows of data.seq_len={prepared.seq_len}, fewer than "
                           f"one global batch of {global_batch_size}; lower the batch size or --config.data.seq_len, "
                           "or use a larger corpus")
  if isinstance(prepared.train, mixture.MixtureRows):
    rows = prepared.train.order(seed)
  else:
    rows = grain.MapDataset.range(num_rows).shuffle(seed=seed % 2**32).repeat()
  # Batches of `local` consecutive rows: local batch s*P + p is process p's slice of global batch s.
  batches = rows.batch(local, drop_remainder=True)[process_index::process_count]
  batches = batches.map(_GatherExamples(prepared.train))
  read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
  return iter(batches.to_iter_dataset(read_options))


def make_eval_batches(prepared: PreparedData, *, batch_size: int, max_batches: int, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, Any]]:
  """Returns this process's slices of the first `max_batches` (all if <= 0) global validation batches.

  Rows stay in corpus order. The last batch is filled with all-padding rows (loss_mask 0), so every batch
  has the full shape and padding adds nothing to a masked loss.
  """
  local = _local_batch_size(batch_size, process_index, process_count)
  num_rows = prepared.val.num_rows
  if num_rows == 0:
    raise errors.DataError("the validation split packs to zero rows; raise --config.data.validation_fraction")
  num_batches = -(-num_rows // batch_size)
  if max_batches > 0:
    num_batches = min(num_batches, max_batches)
  row_len = prepared.val.seq_len + 1
  batches = []
  for step in range(num_batches):
    start = step * batch_size + process_index * local
    indices = np.arange(start, min(start + local, num_rows))
    tokens = np.zeros((local, row_len), dtype=np.int32)
    segment_ids = np.zeros_like(tokens)
    weights = np.ones((local, row_len), dtype=np.float32)  # padding rows count nothing: their segment is 0
    if len(indices):
      picked = prepared.val.rows(indices)
      tokens[:len(indices)], segment_ids[:len(indices)] = picked[:2]
      if len(picked) > 2:
        weights[:len(indices)] = picked[2]
    batches.append(make_example(tokens, segment_ids, weights))
  return batches
