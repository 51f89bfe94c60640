"""Streaming corpora: each source yields (key, cleaned text) one document at a time, cut into shard units.

A source never holds the corpus. `shards(split, docs_per_shard)` lists picklable units decided from the file
list or record counts alone (no text is read), `read(unit)` streams a unit's documents, and `identity()` is a
cheap description of the input (paths, sizes, mtimes, dataset versions) that keys the tokenizer and store caches.
"""

import contextlib
import fcntl
import gzip
import json
import math
import os
from typing import IO
from typing import Any
from typing import Callable
from typing import Iterator

from llm_jax import errors
from llm_jax import paths
from llm_jax.data.split import is_validation
from llm_jax.data.split import validation_keys
from llm_jax.data.text import clean_text
from llm_jax.data.text import text_file_paths

SPLITS = ("train", "validation")
DEFAULT_DATA_DIR = "~/.cache/llm_jax/tfds"
# Record formats, by file name ending; every other matched file is one plain-text document (.gz allowed).
_RECORD_ENDINGS = (".jsonl", ".jsonl.gz", ".parquet")
# Up to this many plain files (and bytes) are all read up front, so the split sees which ones are empty after
# cleaning (as the in-memory loader always did); above it the split is by path alone and no text is read before
# tokenising (only the first file, to fail early on an undecodable one).
_FEW_FILES, _FEW_FILES_BYTES = 16, 256 << 20
# Input bytes per shard of plain files, at most: enough shards for every local core, few enough files at 10 TB.
SHARD_BYTES = 64 << 20
Document = tuple[str, str]
Keep = Callable[[str], bool]


def _decode(data: bytes, where: str) -> str:
  try:
    return data.decode("utf-8").removeprefix("\ufeff")  # A byte-order mark is not text.
  except UnicodeDecodeError as e:
    raise errors.DataError(f"{where} is not valid UTF-8 (byte {data[e.start]:#04x} at byte offset "
                           f"{e.start}); convert it with `iconv -t UTF-8` or drop it from data.text_files") from None


def read_text_file(path: str) -> str:
  """Returns the text of a plain or gzip-compressed (.gz) file; a ValueError names an undecodable one."""
  try:
    with _open_binary(path) as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise errors.DataError(f"{path} cannot be read ({e}); fix or drop it from data.text_files") from None
  return _decode(data, path)


@contextlib.contextmanager
def _open_binary(path: str) -> Iterator[IO[bytes]]:
  """`path` opened for reading through epath (local or gs://), gunzipped when it ends in .gz."""
  with paths.as_path(path).open("rb") as raw:
    if path.endswith(".gz"):
      with gzip.GzipFile(fileobj=raw, mode="rb") as f:
        yield f
    else:
      yield raw


def _texts_of_records(path: str, field: str, key: str = "data") -> Iterator[Any]:
  """The `field` values of a JSONL (plain or .gz) or Parquet file, in file order; errors name the setting as
  `key`.text_field (`key`: data, or data.mixture.<name> for a mixture component)."""
  if path.endswith(".parquet"):
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel  (only Parquet corpora need it)

    try:
      parquet = pq.ParquetFile(path if paths.is_local(path) else paths.as_path(path).open("rb"))
    except (pa.ArrowException, OSError) as e:
      raise errors.DataError(f"{path} is not a readable Parquet file ({' '.join(str(e).split())[:120]}); "
                             "fix it or drop it from the data files") from None
    if field not in parquet.schema_arrow.names:
      raise errors.DataError(f"{key}.text_field={field!r} is not a column of {path} (it has "
                             f"{parquet.schema_arrow.names}); pass --config.{key}.text_field=...")
    kind = parquet.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
      raise errors.DataError(f"{key}.text_field={field!r} of {path} is a {kind} column, not text; point "
                             f"--config.{key}.text_field at a string column")
    row = 0
    for batch in parquet.iter_batches(columns=[field], batch_size=1024):
      for value in batch.column(0).to_pylist():
        row += 1
        yield _text_value(value, f"{path} row {row}", f"{key}.text_field={field!r}")
    return
  with _open_binary(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(_decode(line, f"{path} line {number}"))
      except json.JSONDecodeError as e:
        raise errors.DataError(f"{path} line {number} is not JSON ({e.msg}); fix the file or drop it from "
                               "data.text_files") from None
      if not isinstance(record, dict) or field not in record:
        names = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise errors.DataError(f"{key}.text_field={field!r} is not a field of {path} line {number} (it has {names}); "
                               f"pass --config.{key}.text_field=...")
      yield _text_value(record[field], f"{path} line {number}", f"{key}.text_field={field!r}")


def _text_value(value: Any, where: str, setting: str) -> str | bytes:
  """A record's text (bytes are decoded later); a ValueError names the record when it holds none: a number, list
  or null would otherwise be trained on as its printed form, or silently dropped."""
  if isinstance(value, (str, bytes)):
    return value
  kind = "null" if value is None else f"{type(value).__name__} {json.dumps(value, default=str)[:40]}"
  raise errors.DataError(f"{where}: {setting} is {kind}, not text; fix or drop that record, or point "
                         f"--config.{setting.split('=')[0]} at the text")


def _as_text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else "" if value is None else str(value)


class Source:
  """A corpus as shard units of documents; subclasses define identity, shards and read."""

  name: str = ""

  def identity(self) -> dict[str, Any]:
    raise NotImplementedError

  def shards(self, split: str, docs_per_shard: int) -> list[Any]:
    raise NotImplementedError

  def read(self, unit: Any, keep: Keep | None = None) -> Iterator[Document]:
    """The unit's documents; with `keep`, only those whose key it accepts (their text is then never read)."""
    raise NotImplementedError

  def input_bytes(self, split: str) -> int | None:
    """Bytes of input behind `split` when known (for a progress ETA), else None."""
    del split
    return None

  def documents(self, split: str, keep: Keep | None = None) -> Iterator[Document]:
    """Every document of `split` (whose key `keep` accepts, when given), in corpus order."""
    for unit in self.shards(split, 1 << 20):
      yield from self.read(unit, keep)


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}; pass 'train' or 'validation'")


class TextFiles(Source):
  """Files by glob: plain or .gz text (one document per file, split by a stable hash of the path), or
  JSONL/Parquet records (field `text_field`; split by a stable hash of 'path:record index' for up to _FEW_FILES
  files, else by a stable hash of the path, so each file is read once, by one split)."""

  def __init__(self, pattern: str, validation_fraction: float, text_field: str = "text", key: str = "data"):
    self.name, self.pattern, self.fraction, self.field = "text_files", pattern, validation_fraction, text_field
    self.key = key  # how errors name the settings: data, or data.mixture.<name>
    self.paths = text_file_paths(pattern, "data.text_files", " with --config.data.text_files=...")
    self._identity: dict[str, Any] | None = None
    records = [p.endswith(_RECORD_ENDINGS) for p in self.paths]
    if any(records) and not all(records):
      raise errors.DataError(f"data.text_files={pattern!r} mixes record files ({'/'.join(_RECORD_ENDINGS)}) with "
                             "plain text; point it at one kind")
    self.records = all(records)
    self._few: dict[str, list[str]] | None = None
    self._by_record = self.records and len(self.paths) <= _FEW_FILES
    if self.records:
      self._check_records()
      self._validation = set() if self._by_record else validation_keys(self.paths, self.fraction)
    elif len(self.paths) <= _FEW_FILES and sum(map(paths.size, self.paths)) <= _FEW_FILES_BYTES:
      self._validation = self._split_few_files()
    else:
      read_text_file(self.paths[0])  # An undecodable first file fails before any tokenising.
      self._validation = validation_keys(self.paths, self.fraction)

  def _check_records(self) -> None:
    if not 0.0 < self.fraction < 1.0:
      validation_keys(["a", "b"], self.fraction)  # Raises its one-line message.
    for path in self.paths:
      for _ in _texts_of_records(path, self.field, self.key):
        return
    raise errors.DataError(f"data.text_files={self.pattern!r} holds no records; point it at non-empty JSONL/Parquet "
                           "files")

  def _split_few_files(self) -> set[str]:
    """Today's rules for a handful of files: split the non-empty ones by path, or by paragraph below 3."""
    texts = {p: clean_text(read_text_file(p)) for p in self.paths}
    texts = {p: t for p, t in texts.items() if t}
    if not texts:
      raise errors.DataError(f"data.text_files={self.pattern!r} has no text left after cleaning (empty files or only "
                             "[bracketed] notes); point --config.data.text_files at files with text")
    if len(texts) >= 3:
      return validation_keys(list(texts), self.fraction)
    self._few = {}
    for path, text in texts.items():
      paragraphs = text.split("\n")
      if len(paragraphs) >= 2:
        self._few[path] = paragraphs
    if not self._few:
      raise errors.DataError(f"data.text_files={self.pattern!r} has {len(texts)} file(s) of one paragraph each, too "
                             "little to split into train and validation; add files or paragraphs (lines) to "
                             "data.text_files")
    return set()

  def identity(self) -> dict[str, Any]:
    if self._identity is None:  # Computed once: it stats every file.
      self._identity = self._compute_identity()
    return self._identity

  def _compute_identity(self) -> dict[str, Any]:
    stats = [(p, *paths.size_and_mtime_ns(p)) for p in self.paths]
    return {"source": self.name, "files": stats, "validation_fraction": self.fraction,
            "text_field": self.field if self.records else None,
            "rules": [_FEW_FILES, _FEW_FILES_BYTES, SHARD_BYTES, "records by file above _FEW_FILES"]}

  def _split_paths(self, split: str) -> list[str]:
    if self._by_record or self._few is not None:
      return list(self._few) if self._few is not None else list(self.paths)
    return [p for p in self.paths if (p in self._validation) == (split == "validation")]

  def shards(self, split: str, docs_per_shard: int) -> list[Any]:
    _check_split(split)
    split_paths = self._split_paths(split)
    if self.records:  # A file's record count is unknown until read: one shard per file.
      return [(split, (p,)) for p in split_paths]
    shards, group, size = [], [], 0
    for path in split_paths:  # Up to docs_per_shard files and about SHARD_BYTES each: a function of the file list.
      group.append(path)
      size += paths.size(path)
      if len(group) == docs_per_shard or size >= SHARD_BYTES:
        shards.append((split, tuple(group)))
        group, size = [], 0
    return shards + ([(split, tuple(group))] if group else [])

  def input_bytes(self, split: str) -> int | None:
    total = sum(paths.size(p) for p in self._split_paths(split))
    if self._by_record:  # Both splits read every file; each keeps about its share of the records.
      return round(total * (self.fraction if split == "validation" else 1.0 - self.fraction))
    return total

  def read(self, unit: Any, keep: Keep | None = None) -> Iterator[Document]:
    split, unit_paths = unit
    for path in unit_paths:
      if keep is not None and not self.records and not keep(path):
        continue
      if self.records:
        for index, value in enumerate(_texts_of_records(path, self.field, self.key)):
          key = f"{path}:{index}"
          in_split = not self._by_record or is_validation(key, self.fraction) == (split == "validation")
          if in_split and (keep is None or keep(key)):
            text = clean_text(_as_text(value))
            if text:
              yield key, text
      elif self._few is not None:
        paragraphs = self._few[path]
        num_validation = min(max(math.ceil(self.fraction * len(paragraphs)), 1), len(paragraphs) - 1)
        part = paragraphs[-num_validation:] if split == "validation" else paragraphs[:-num_validation]
        yield path, "\n".join(part)
      else:
        text = clean_text(read_text_file(path))
        if text:
          yield path, text


class TfdsSplits(Source):
  """A prepared TFDS dataset (array_record) read index by index; its named splits are ours."""

  def __init__(self, name: str, directory: str, split_names: dict[str, str], text_key: str):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    self.name, self.directory, self.split_names, self.text_key = name, directory, split_names, text_key
    not_prepared = (f"TFDS dataset {name!r} is not prepared under data_dir={directory!r}; on a machine with "
                    f"internet run `tfds build {name} --file_format=array_record --data_dir={directory}` and "
                    "copy that directory here (or set --config.data.data_dir)")
    if not name:
      raise errors.ConfigError("data.corpus='tfds' needs a dataset name; pass --config.data.tfds_name=NAME")
    try:
      builder = tfds.builder(name, data_dir=directory)
    except tfds.core.DatasetNotFoundError:
      raise errors.DataError(not_prepared) from None
    if not builder.is_prepared():
      raise errors.DataError(not_prepared)
    file_format = builder.info.file_format
    if file_format is None or file_format.name not in ("ARRAY_RECORD", "PARQUET"):
      raise errors.DataError(f"TFDS dataset {name!r} under {directory!r} is stored as {file_format}, which needs "
                             f"TensorFlow; rebuild it with `tfds build {name} --file_format=array_record "
                             "--data_dir=...`")
    for split, split_name in split_names.items():
      key = "tfds_train_split" if split == "train" else "tfds_validation_split"
      if split_name.split("[")[0] not in builder.info.splits:
        raise errors.DataError(f"data.{key}={split_name!r} is not a split of {name!r} (it has "
                               f"{sorted(builder.info.splits)}); pass --config.data.{key}=...")
    if text_key not in builder.info.features:
      raise errors.DataError(f"data.tfds_text_key={text_key!r} is not a feature of {name!r} (it has "
                             f"{sorted(builder.info.features)}); pass --config.data.tfds_text_key=...")
    self._version = str(builder.info.version)
    self._sizes = {s: builder.info.splits[n.split("[")[0]].num_bytes for s, n in split_names.items()}
    self._sources: dict[str, Any] = {}

  def _source(self, split: str) -> Any:
    if split not in self._sources:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

      self._sources[split] = tfds.data_source(self.name, split=self.split_names[split], data_dir=self.directory,
                                              download=False)
    return self._sources[split]

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_sources": {}}  # Open readers stay behind; each process reopens its own.

  def identity(self) -> dict[str, Any]:
    return {"source": "tfds", "name": self.name, "version": self._version, "directory": self.directory,
            "splits": self.split_names, "text_key": self.text_key,
            "lengths": {s: len(self._source(s)) for s in self.split_names}}

  def input_bytes(self, split: str) -> int | None:
    return self._sizes.get(split) or None

  def shards(self, split: str, docs_per_shard: int) -> list[Any]:
    _check_split(split)
    length = len(self._source(split))
    return [(split, i, min(i + docs_per_shard, length)) for i in range(0, length, docs_per_shard)]

  def read(self, unit: Any, keep: Keep | None = None) -> Iterator[Document]:
    split, start, stop = unit
    source = self._source(split)
    for index in range(start, stop):
      if keep is not None and not keep(f"{self.split_names[split]}:{index}"):
        continue
      text = clean_text(_as_text(source[index][self.text_key]))
      if text:
        yield f"{self.split_names[split]}:{index}", text


def sotu_source(directory: str) -> TfdsSplits:
  """The built-in corpus: prepares the sotu builder under `directory` on first use (seconds)."""
  from llm_jax.data import sotu  # pylint: disable=import-outside-toplevel  (it imports tensorflow_datasets)

  os.makedirs(directory, exist_ok=True)
  # Processes sharing a machine (and data_dir) would otherwise race to build the same files.
  with open(os.path.join(directory, ".sotu.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    builder = sotu.Sotu(data_dir=directory)
    if not builder.is_prepared():
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

      # One line says what happens; TFDS's progress bars would be dozens of lines on stderr, where a user (or a
      # script) expects only errors.
      print(f"data: building the built-in sotu corpus under {directory} (first use, a few seconds)", flush=True)
      tfds.disable_progress_bar()
      builder.download_and_prepare(file_format="array_record")
  return TfdsSplits("sotu", directory, {"train": "train", "validation": "validation"}, "text")

