"""The token store: a corpus tokenised once into memory-mapped shards of `[bos] + ids + [eos]` streams, shared
by every run with the same source, split rule and tokenizer, and read back as packed rows.

Layout under `store_dir/<fingerprint>/`: per split and shard i, `i.tokens` (uint16 or uint32 ids), `i.offsets`
(int64 start of each document in the shard's stream) and `i.json` (counts, sizes, sha256; written last, so its
presence means the shard is whole); `manifest.json` is written after every shard. Shard boundaries come from the
source's file list or record counts alone, so a preparation killed at any point resumes at the first missing
shard and ends byte-identical. Shapes: B rows, L1 = seq_len + 1 tokens per row.

`store_dir` may be local or on an object store (gs://), all through epath: locally a file is written under a
temporary name and renamed; on an object store an object appears whole when its upload ends, so files are written
under their final names. Reading memory-maps local shards and reads byte ranges of remote ones (seek + read), so
a gs:// store is never downloaded whole.
"""

import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import os
import threading
import time
from typing import Any
from typing import Callable
from typing import Iterable

import numpy as np

from llm_jax import errors
from llm_jax import paths
from llm_jax.data import workers as workers_lib
from llm_jax.data.packing import PAD_ID
from llm_jax.data.sources import SPLITS
from llm_jax.data.sources import Source
from llm_jax.tokenizer import load_tokenizer

# Part of the fingerprint: bump it whenever tokenising or the layout changes.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Documents per shard for sources whose units are documents (plain files, TFDS records): about 100 MB of sotu-like
# text per shard, few enough files for a 10 TB corpus.
DOCS_PER_SHARD = 1024
# Characters handed to the tokenizer at once: bounds memory by the batch, not the corpus.
_BATCH_CHARS = 2 << 20
Log = Callable[[str], None]


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def fingerprint(source_identity: dict[str, Any], tokenizer_sha256: str, docs_per_shard: int) -> str:
  """The store's key: format version, the source's identity (inputs and split rule), tokenizer file and sharding."""
  text = json.dumps({"format": FORMAT_VERSION, "source": source_identity, "tokenizer_sha256": tokenizer_sha256,
                     "docs_per_shard": docs_per_shard}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def _shard_prefix(path: str, split: str, index: int) -> str:
  return os.path.join(path, split, f"{index:06d}")


def _rebuild_hint(prefix: str, path: str) -> str:
  return (f"delete {prefix}.* and {os.path.join(path, MANIFEST)} and rerun python -m llm_jax.prepare with the same "
          "config (it rebuilds only missing shards)")


class Progress:
  """A progress line every `every_s` seconds: documents, tokens, MB of text, MB/s and an ETA when the size is known."""

  def __init__(self, log: Log, total_bytes: int | None = None, every_s: float = 5.0):
    self.log, self.total_bytes, self.every_s = log, total_bytes, every_s
    self.documents = self.tokens = self.bytes = 0
    self.started = self._last = time.perf_counter()

  def add(self, documents: int, tokens: int, num_bytes: int) -> None:
    self.documents += documents
    self.tokens += tokens
    self.bytes += num_bytes
    if time.perf_counter() - self._last >= self.every_s:
      self._last = time.perf_counter()
      self.log(self.line("preparing"))

  def line(self, what: str) -> str:
    elapsed = max(time.perf_counter() - self.started, 1e-9)
    rate = self.bytes / elapsed / 1e6
    text = (f"{what}: {self.documents:,} documents, {self.tokens:,} tokens, {self.bytes / 1e6:,.1f} MB of text "
            f"in {elapsed:.1f} s ({rate:.2f} MB/s)")
    if self.total_bytes and rate > 0 and what == "preparing":
      left_s = max(self.total_bytes - self.bytes, 0) / 1e6 / rate
      text += f", about {left_s:.0f} s left of {self.total_bytes / 1e6:,.0f} MB"
    return text


def _encode_batches(source: Source, unit: Any, tokenizer: Any,
                    threads: int) -> Iterable[tuple[list[str], list[list[int]]]]:
  batch, chars = [], 0
  for _, text in source.read(unit):
    batch.append(text)
    chars += len(text)
    if chars >= _BATCH_CHARS:
      yield batch, tokenizer.encode_batch(batch, threads)
      batch, chars = [], 0
  if batch:
    yield batch, tokenizer.encode_batch(batch, threads)


def _write_shard(source: Source, unit: Any, tokenizer: Any, prefix: str, progress: Progress | None,
                 threads: int) -> None:
  """Tokenises one unit into `prefix`.tokens/.offsets (atomically), then its `prefix`.json."""
  dtype, has_bos = token_dtype(tokenizer.vocab_size), tokenizer.bos_id >= 0
  paths.makedirs(os.path.dirname(prefix))
  tmp = f".tmp{os.getpid()}" if paths.is_local(prefix) else ""  # see the module docstring
  if tmp:  # a killed writer's partial files of this shard (a shard has one writer: its owner, under the store lock)
    for stale in glob.glob(glob.escape(prefix) + ".*.tmp*"):
      os.remove(stale)
  digest, offsets, stream = hashlib.sha256(), [], 0
  counts = {"documents": 0, "num_tokens": 0, "bytes": 0}
  with paths.as_path(prefix + ".tokens" + tmp).open("wb") as f:
    for texts, ids in _encode_batches(source, unit, tokenizer, threads):
      num_tokens = num_bytes = 0
      for text, doc in zip(texts, ids):
        row = np.empty(len(doc) + 1 + has_bos, dtype=dtype)
        if has_bos:
          row[0] = tokenizer.bos_id
        row[has_bos:-1], row[-1] = doc, tokenizer.eos_id
        data = row.tobytes()
        f.write(data)
        digest.update(data)
        offsets.append(stream)
        stream += len(row)
        num_tokens += len(doc)
        num_bytes += len(text.encode("utf-8"))
      counts["documents"] += len(texts)
      counts["num_tokens"] += num_tokens
      counts["bytes"] += num_bytes
      if progress is not None:
        progress.add(len(texts), num_tokens, num_bytes)
  offsets_bytes = np.asarray(offsets, dtype=np.int64).tobytes()
  paths.write_atomic(prefix + ".offsets", offsets_bytes)
  if tmp:
    os.replace(prefix + ".tokens" + tmp, prefix + ".tokens")
  meta = {**counts, "stream_tokens": stream, "tokens_bytes": stream * dtype.itemsize,
          "offsets_bytes": len(offsets_bytes), "tokens_sha256": digest.hexdigest(),
          "offsets_sha256": hashlib.sha256(offsets_bytes).hexdigest()}
  paths.write_atomic(prefix + ".json", json.dumps(meta, sort_keys=True).encode())


def _read_json(path: str, fix: str) -> dict[str, Any]:
  """A JSON object file of the store; a ValueError names the file and `fix` when it is not one (cut or edited)."""
  try:
    record = json.loads(paths.as_path(path).read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.DataError(f"token store file {path} is not valid JSON ({str(e).splitlines()[0]}); {fix}") from None
  if not isinstance(record, dict):
    raise errors.DataError(f"token store file {path} holds a JSON {type(record).__name__}, not an object; {fix}")
  return record


def _manifest_fix(path: str) -> str:
  return (f"delete {path} and rerun python -m llm_jax.prepare with the same config (it rewrites it from the "
          "shards' own records)")


def _read_shard_record(prefix: str, path: str) -> dict[str, Any]:
  return _read_json(prefix + ".json", _rebuild_hint(prefix, path))


def _check_manifest(manifest: dict[str, Any], manifest_path: str) -> None:
  """Refuses a manifest that lacks what reading needs (an edited or foreign file), naming it and the fix."""
  fix = _manifest_fix(manifest_path)
  if manifest.get("format") != FORMAT_VERSION:
    raise errors.DataError(f"token store manifest {manifest_path} has format {manifest.get('format')!r}, not "
                           f"{FORMAT_VERSION}; {fix}")
  splits = manifest.get("splits")
  missing = [k for k in ("dtype", "vocab_size", "splits") if k not in manifest]
  missing += [] if not isinstance(splits, dict) else [f"splits.{s}" for s in SPLITS if not isinstance(
      splits.get(s), dict) or not isinstance(splits[s].get("shards"), list)]
  if missing:
    raise errors.DataError(f"token store manifest {manifest_path} lacks {', '.join(missing)}; {fix}")


def check_shard_sizes(path: str, split: str, index: int, meta: dict[str, Any]) -> None:
  """Checks a shard's files against their recorded sizes (cheap: no data read); a ValueError names the shard."""
  prefix = _shard_prefix(path, split, index)
  for kind in ("tokens", "offsets"):
    name = f"{prefix}.{kind}"
    size = paths.size(name) if paths.as_path(name).exists() else -1
    if size != meta[f"{kind}_bytes"]:
      raise errors.DataError(f"token store shard {name} is {size} bytes, not the {meta[f'{kind}_bytes']} recorded "
                             f"(truncated or missing); {_rebuild_hint(prefix, path)}")


def verify_shard(path: str, split: str, index: int, meta: dict[str, Any]) -> None:
  """Checks a shard's files against their recorded sizes and sha256; a ValueError names the shard and the fix."""
  check_shard_sizes(path, split, index, meta)
  prefix = _shard_prefix(path, split, index)
  for kind in ("tokens", "offsets"):
    name = f"{prefix}.{kind}"
    if paths.file_sha256(name) != meta[f"{kind}_sha256"]:
      raise errors.DataError(f"token store shard {name} does not match its recorded sha256 (corrupted); "
                             f"{_rebuild_hint(prefix, path)}")


def shard_owner(index: int, process_count: int) -> int:
  """The process that writes, and verifies, shard `index` of a split: shard i belongs to process i mod
  process_count."""
  return index % process_count


def write_shards(source: Source, tokenizer: Any, path: str, *, docs_per_shard: int = DOCS_PER_SHARD,
                 process_index: int = 0, process_count: int = 1, workers: int = 1, log: Log = print) -> None:
  """Writes this process's missing shards (`shard_owner`) of every split on `workers` local cores: one process
  per core when there are several shards to write (reading and cleaning text are single-threaded, so processes
  scale where threads would not), each encoding on workers // processes threads; with one shard, one process
  encoding on `workers` threads.

  Shards already whole (from a killed run) are kept and their sha256 verified at the end.
  """
  progress = Progress(log, sum(source.input_bytes(s) or 0 for s in SPLITS) or None)
  todo, kept = [], []
  for split in SPLITS:
    for index, unit in enumerate(source.shards(split, docs_per_shard)):
      if shard_owner(index, process_count) == process_index:
        prefix = _shard_prefix(path, split, index)
        (kept if paths.as_path(prefix + ".json").exists() else todo).append((split, index, unit))
  cores = max(1, workers)
  workers = max(1, min(cores, len(todo)))
  threads = max(1, cores // workers)
  if workers == 1:
    for split, index, unit in todo:
      _write_shard(source, unit, tokenizer, _shard_prefix(path, split, index), progress, threads)
  else:
    jobs = [(source, tokenizer.path, unit, _shard_prefix(path, split, index), threads)
            for split, index, unit in todo]
    _write_in_workers(jobs, workers, progress, path, len(kept))
  for split, index, _ in kept:
    verify_shard(path, split, index, _read_shard_record(_shard_prefix(path, split, index), path))
  log(progress.line(f"prepared shards of process {process_index}/{process_count}" if process_count > 1 else
                    "prepared") + (f"; kept {len(kept)} shard(s) from an interrupted run" if kept else ""))


def _write_in_workers(jobs: list[tuple[Source, str, Any, str, int]], workers: int, progress: Progress, path: str,
                      kept: int) -> None:
  """The shard jobs on `workers` spawned processes that die with this one (`workers.spawn_pool`)."""
  pool = workers_lib.spawn_pool(workers)
  try:
    for future in concurrent.futures.as_completed([pool.submit(_shard_job, job) for job in jobs]):
      progress.add(*future.result())
  except concurrent.futures.process.BrokenProcessPool:
    written = sum(paths.as_path(job[3] + ".json").exists() for job in jobs)
    raise errors.RunError(
        f"a worker process preparing the token store {path} died (killed, often by the out-of-memory "
        "killer, or it could not start: a script that trains or prepares data at its top level needs an "
        f"`if __name__ == '__main__':` guard); the {kept + written} whole shard(s) are kept: run the same "
        "command again to resume") from None
  except BaseException:
    workers_lib.stop_pool(pool)  # a signal (Interrupted) or another error: stop them now, not after their shards
    raise
  pool.shutdown()


_WORKER_TOKENIZERS: dict[str, Any] = {}


def _shard_job(job: tuple[Source, str, Any, str, int]) -> tuple[int, int, int]:
  """One shard in a worker process; returns its (documents, tokens, bytes) for the parent's progress line."""
  source, tokenizer_path, unit, prefix, threads = job
  if tokenizer_path not in _WORKER_TOKENIZERS:
    _WORKER_TOKENIZERS[tokenizer_path] = load_tokenizer(tokenizer_path)
  _write_shard(source, unit, _WORKER_TOKENIZERS[tokenizer_path], prefix, None, threads)
  meta = _read_shard_record(prefix, os.path.dirname(os.path.dirname(prefix)))
  return meta["documents"], meta["num_tokens"], meta["bytes"]


def write_manifest(source: Source, tokenizer: Any, path: str, *, docs_per_shard: int = DOCS_PER_SHARD) -> None:
  """Gathers every shard's record into manifest.json (process 0, after all workers finished their shards)."""
  splits = {}
  for split in SPLITS:
    shards = []
    for index in range(len(source.shards(split, docs_per_shard))):
      meta_path = _shard_prefix(path, split, index) + ".json"
      if not paths.as_path(meta_path).exists():
        raise errors.DataError(f"token store shard {meta_path} is missing (a worker did not finish, or data.store_dir "
                               "is not one file system shared by every process); rerun the preparation on a shared "
                               "store_dir")
      shards.append(_read_shard_record(_shard_prefix(path, split, index), path))
    totals = {k: sum(s[k] for s in shards) for k in ("documents", "num_tokens", "bytes", "stream_tokens")}
    splits[split] = {**totals, "shards": shards}
  manifest = {"format": FORMAT_VERSION, "fingerprint": os.path.basename(path),
              "dtype": token_dtype(tokenizer.vocab_size).name, "vocab_size": tokenizer.vocab_size,
              "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "splits": splits}
  paths.write_atomic(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())


def build(source: Source, tokenizer: Any, path: str, *, docs_per_shard: int = DOCS_PER_SHARD, workers: int = 1,
          log: Log = print) -> str:
  """Single-process preparation: the missing shards, then the manifest; returns `path`."""
  if not paths.as_path(os.path.join(path, MANIFEST)).exists():
    write_shards(source, tokenizer, path, docs_per_shard=docs_per_shard, workers=workers, log=log)
    write_manifest(source, tokenizer, path, docs_per_shard=docs_per_shard)
  return path


class RangedTokens:
  """A remote shard's token file read by byte ranges (`tokens[a:b]`) through epath: no memory map, no download."""

  def __init__(self, path: str, dtype: np.dtype):
    self.path, self.dtype = path, np.dtype(dtype)
    self._file: Any = None
    self._lock = threading.Lock()  # one handle, one position: grain's reader threads take turns

  def __getitem__(self, window: slice) -> np.ndarray:
    size = self.dtype.itemsize
    with self._lock:
      if self._file is None:
        self._file = paths.as_path(self.path).open("rb")
      self._file.seek(window.start * size)
      data = self._file.read((window.stop - window.start) * size)
    return np.frombuffer(data, dtype=self.dtype)


class SplitStore:
  """One split's shards as one token stream, opened lazily (memory maps locally, byte ranges on an object store);
  picklable (shards are reopened per process)."""

  def __init__(self, path: str, split: str, meta: dict[str, Any], dtype: str, vocab_size: int = 0):
    self.path, self.split, self.dtype, self.vocab_size = path, split, np.dtype(dtype), vocab_size
    self.meta = meta
    sizes = [s["stream_tokens"] for s in meta["shards"]]
    docs = [s["documents"] for s in meta["shards"]]
    self.shard_token_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    self.shard_doc_starts = np.concatenate([[0], np.cumsum(docs, dtype=np.int64)])
    self.num_tokens = int(self.shard_token_starts[-1])  # Stream length, bos/eos included.
    self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_maps": {}}

  def _shard(self, index: int) -> tuple[Any, np.ndarray]:
    if index not in self._maps:
      prefix = _shard_prefix(self.path, self.split, index)
      if paths.is_local(prefix):
        self._maps[index] = (np.memmap(prefix + ".tokens", dtype=self.dtype, mode="r"),
                             np.memmap(prefix + ".offsets", dtype=np.int64, mode="r"))
      else:  # Checked here, at first use, not at open (see TokenStore.open); offsets: 8 bytes per document, read whole.
        check_shard_sizes(self.path, self.split, index, self.meta["shards"][index])
        offsets = np.frombuffer(paths.as_path(prefix + ".offsets").read_bytes(), dtype=np.int64)
        self._maps[index] = (RangedTokens(prefix + ".tokens", self.dtype), offsets)
    return self._maps[index]

  def num_rows(self, seq_len: int) -> int:
    return -(-self.num_tokens // (seq_len + 1))

  def _checked(self, ids: np.ndarray, shard: int) -> np.ndarray:
    """`ids` of shard `shard`, refused (naming the shard) when one lies past the vocabulary: damaged bytes, which the
    model would otherwise turn into a non-finite loss blamed on the learning rate."""
    if self.vocab_size and len(ids) and int(ids.max()) >= self.vocab_size:
      prefix = _shard_prefix(self.path, self.split, shard)
      raise errors.DataError(f"token store shard {prefix}.tokens holds id {int(ids.max())}, past the vocabulary of "
                             f"{self.vocab_size} (the file is damaged); {_rebuild_hint(prefix, self.path)}")
    return ids

  def rows(self, indices_B: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (tokens_BxL1, segment_ids_BxL1) int32 of the given rows, exactly as `pack_documents` cuts them."""
    row_len = seq_len + 1
    indices_B = np.asarray(indices_B, dtype=np.int64).reshape(-1)
    tokens_BxL1 = np.full((len(indices_B), row_len), PAD_ID, dtype=np.int32)
    segment_ids_BxL1 = np.zeros((len(indices_B), row_len), dtype=np.int32)
    for b, row in enumerate(indices_B):
      start = int(row) * row_len
      end = min(start + row_len, self.num_tokens)
      first_doc, position = None, start
      while position < end:  # A row spans one shard, or a few at shard boundaries.
        shard = int(np.searchsorted(self.shard_token_starts, position, side="right")) - 1
        stop = min(end, int(self.shard_token_starts[shard + 1]))
        local = position - int(self.shard_token_starts[shard])
        shard_tokens, shard_offsets = self._shard(shard)
        tokens_BxL1[b, position - start:stop - start] = self._checked(shard_tokens[local:local + stop - position],
                                                                      shard)
        local_positions = np.arange(local, local + stop - position)
        doc = self.shard_doc_starts[shard] + np.searchsorted(shard_offsets, local_positions, side="right") - 1
        first_doc = doc[0] if first_doc is None else first_doc
        segment_ids_BxL1[b, position - start:stop - start] = doc - first_doc + 1
        position = stop
    return tokens_BxL1, segment_ids_BxL1


@dataclasses.dataclass(frozen=True, eq=False)
class TokenStore:
  """An opened store: its manifest and one `SplitStore` per split."""

  path: str
  manifest: dict[str, Any]
  splits: dict[str, SplitStore]

  @classmethod
  def open(cls, path: str) -> "TokenStore":
    """Reads the manifest and checks every shard's size, contents being checked by `verify`. Locally that is one
    stat per file (O(shards), about 2 s at 100,000 shards); on an object store a stat is a request (tens of ms),
    so there each shard is checked when a process first reads it instead, and start-up reads only the manifest."""
    manifest_path = os.path.join(path, MANIFEST)
    if not paths.as_path(manifest_path).exists():
      raise errors.DataError(f"no token store at {path} (no {MANIFEST}); run python -m llm_jax.prepare --config=...")
    manifest = _read_json(manifest_path, _manifest_fix(manifest_path))
    _check_manifest(manifest, manifest_path)
    for split, entry in manifest["splits"].items():
      for index, meta in enumerate(entry["shards"]):
        if paths.is_local(path):
          check_shard_sizes(path, split, index, meta)
    splits = {s: SplitStore(path, s, e, manifest["dtype"], manifest["vocab_size"])
              for s, e in manifest["splits"].items()}
    return cls(path, manifest, splits)

  def verify(self, process_index: int = 0, process_count: int = 1) -> int:
    """Checks the sha256 of this process's shards (`shard_owner`, as in `write_shards`) against the manifest,
    reading them whole; returns how many it checked. The processes together check every shard once, so a pod
    verifies a store as fast as it wrote it."""
    checked = 0
    for split, entry in self.manifest["splits"].items():
      for index, meta in enumerate(entry["shards"]):
        if shard_owner(index, process_count) == process_index:
          verify_shard(self.path, split, index, meta)
          checked += 1
    return checked

  def counts(self, split: str) -> dict[str, int]:
    """documents, num_tokens (ids without bos/eos) and bytes (UTF-8 of the cleaned text) of `split`."""
    entry = self.manifest["splits"][split]
    return {k: entry[k] for k in ("documents", "num_tokens", "bytes")}
