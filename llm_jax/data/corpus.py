"""Corpora as lists of cleaned documents: the built-in `sotu`, local text files, and prepared TFDS datasets.

Splits are made per document by a stable hash of its name (`split.validation_keys`), so they do not depend on
file order, Python's hash seed or the machine.
"""

import dataclasses
import fcntl
import math
import os

from llm_jax.data.split import validation_keys
from llm_jax.data.text import clean_text
from llm_jax.data.text import read_utf8
from llm_jax.data.text import text_file_paths

CORPORA = ("sotu", "text_files", "tfds")
SPLITS = ("train", "validation")
DEFAULT_DATA_DIR = "~/.cache/llm_jax/tfds"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which corpus to read and how to cut it (config.py documents each field and builds this)."""

  corpus: str = "sotu"
  text_files: str = ""
  tfds_name: str = ""
  tfds_text_key: str = "text"
  tfds_train_split: str = "train"
  tfds_validation_split: str = "validation"
  data_dir: str = ""
  validation_fraction: float = 0.05
  seq_len: int = 128


def data_dir(data_cfg: DataConfig) -> str:
  """Returns the TFDS data directory: data.data_dir, or ~/.cache/llm_jax/tfds when it is empty."""
  return os.path.expanduser(data_cfg.data_dir or DEFAULT_DATA_DIR)


def load_documents(data_cfg: DataConfig, split: str) -> list[str]:
  """Returns the cleaned, non-empty documents of `split` ('train' or 'validation') of corpus data.corpus.

  'sotu' fixes its split when the dataset is built (sotu.VALIDATION_FRACTION) and ignores
  data.validation_fraction; 'text_files' uses it; 'tfds' uses the dataset's own named splits.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}; pass 'train' or 'validation'")
  if data_cfg.corpus == "sotu":
    return _load_sotu(data_cfg, split)
  if data_cfg.corpus == "text_files":
    return _load_text_files(data_cfg, split)
  if data_cfg.corpus == "tfds":
    return _load_tfds(data_cfg, split)
  raise ValueError(f"data.corpus={data_cfg.corpus!r} is not one of {CORPORA}; pass e.g. --config.data.corpus=sotu")


def _load_sotu(data_cfg: DataConfig, split: str) -> list[str]:
  """Prepares the sotu builder under data_dir on first use (seconds), then reads it back."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  from llm_jax.data import sotu  # pylint: disable=import-outside-toplevel  (it imports tensorflow_datasets)

  directory = data_dir(data_cfg)
  os.makedirs(directory, exist_ok=True)
  # Processes sharing a machine (and data_dir) would otherwise race to build the same files.
  with open(os.path.join(directory, ".sotu.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    builder = sotu.Sotu(data_dir=directory)
    if not builder.is_prepared():
      builder.download_and_prepare(file_format="array_record")
  source = tfds.data_source("sotu", split=split, data_dir=directory, download=False)
  return [source[i]["text"].decode("utf-8") for i in range(len(source))]


def _load_text_files(data_cfg: DataConfig, split: str) -> list[str]:
  """Each file is one document, split by a stable hash of its path.

  With only one or two non-empty files a per-file split would leave a side empty or make it a whole file,
  so instead every file is cut at a paragraph: its last ceil(fraction * paragraphs) paragraphs (at least
  one) go to validation, the rest to train. A contiguous tail keeps neighbouring paragraphs, which often
  repeat each other, from landing on both sides.
  """
  pattern = data_cfg.text_files
  texts = {p: clean_text(read_utf8(p)) for p in text_file_paths(pattern, "data.text_files",
                                                                 " with --config.data.text_files=...")}
  texts = {p: t for p, t in texts.items() if t}
  if not texts:
    raise ValueError(f"data.text_files={pattern!r} has no text left after cleaning (empty files or only "
                     "[bracketed] notes); point --config.data.text_files at files with text")
  fraction = data_cfg.validation_fraction
  if len(texts) >= 3:
    validation = validation_keys(list(texts), fraction)
    return [t for p, t in texts.items() if (p in validation) == (split == "validation")]
  documents = []
  for text in texts.values():
    paragraphs = text.split("\n")
    if len(paragraphs) < 2:
      continue
    num_validation = min(max(math.ceil(fraction * len(paragraphs)), 1), len(paragraphs) - 1)
    part = paragraphs[-num_validation:] if split == "validation" else paragraphs[:-num_validation]
    documents.append("\n".join(part))
  if not documents:
    raise ValueError(f"data.text_files={pattern!r} has {len(texts)} file(s) of one paragraph each, too little to "
                     "split into train and validation; add files or paragraphs (lines) to data.text_files")
  return documents


def _load_tfds(data_cfg: DataConfig, split: str) -> list[str]:
  """Reads an already prepared TFDS dataset; it never downloads, so it fails fast when data is missing."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  name, directory = data_cfg.tfds_name, data_dir(data_cfg)
  if not name:
    raise ValueError("data.corpus='tfds' needs a dataset name; pass --config.data.tfds_name=NAME")
  not_prepared = (f"TFDS dataset {name!r} is not prepared under data_dir={directory!r}; on a machine with "
                  f"internet run `tfds build {name} --file_format=array_record --data_dir={directory}` and "
                  "copy that directory here (or set --config.data.data_dir)")
  try:
    builder = tfds.builder(name, data_dir=directory)
  except tfds.core.DatasetNotFoundError:
    raise ValueError(not_prepared) from None
  if not builder.is_prepared():
    raise ValueError(not_prepared)
  file_format = builder.info.file_format
  if file_format is None or file_format.name not in ("ARRAY_RECORD", "PARQUET"):
    raise ValueError(f"TFDS dataset {name!r} under {directory!r} is stored as {file_format}, which needs "
                     f"TensorFlow; rebuild it with `tfds build {name} --file_format=array_record --data_dir=...`")
  key = "tfds_train_split" if split == "train" else "tfds_validation_split"
  split_name = getattr(data_cfg, key)
  if split_name.split("[")[0] not in builder.info.splits:
    raise ValueError(f"data.{key}={split_name!r} is not a split of {name!r} (it has "
                     f"{sorted(builder.info.splits)}); pass --config.data.{key}=...")
  text_key = data_cfg.tfds_text_key
  if text_key not in builder.info.features:
    raise ValueError(f"data.tfds_text_key={text_key!r} is not a feature of {name!r} (it has "
                     f"{sorted(builder.info.features)}); pass --config.data.tfds_text_key=...")
  source = tfds.data_source(name, split=split_name, data_dir=directory, download=False)
  texts = (source[i][text_key] for i in range(len(source)))
  documents = [clean_text(t.decode("utf-8") if isinstance(t, bytes) else str(t)) for t in texts]
  documents = [d for d in documents if d]
  if not documents:
    raise ValueError(f"split {split_name!r} of TFDS dataset {name!r} has no text in feature {text_key!r} after "
                     "cleaning; check --config.data.tfds_text_key")
  return documents
