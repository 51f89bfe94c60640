"""Tests for the corpora: the sotu TFDS builder, text files, prepared TFDS datasets, splits and their errors."""

import glob
import hashlib
import os
import time

import pytest
import tensorflow_datasets as tfds
from conftest import raises_one_line

from llm_jax import errors
from llm_jax.data import sotu
from llm_jax.data import split
from llm_jax.data.corpus import DataConfig
from llm_jax.data.corpus import load_documents
from llm_jax.data.text import clean_text
from llm_jax.data.text import read_utf8


def _data_config(**overrides) -> DataConfig:
  return DataConfig(**overrides)


def _reference_is_validation(key: str, fraction: float) -> bool:
  return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2**64 < fraction


@pytest.fixture(scope="module")
def sotu_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("tfds"))
  load_documents(_data_config(data_dir=directory), "train")
  return directory


def test_validation_keys_follow_the_hash():
  keys = [f"doc-{i}" for i in range(400)]
  chosen = split.validation_keys(keys, 0.1)
  assert chosen == {k for k in keys if _reference_is_validation(k, 0.1)}
  assert 20 < len(chosen) < 60
  assert split.validation_keys(list(reversed(keys)), 0.1) == chosen


def test_validation_keys_never_leave_a_side_empty():
  assert len(split.validation_keys(["a", "b", "c"], 1e-9)) == 1
  assert len(split.validation_keys(["a", "b", "c"], 1 - 1e-9)) == 2
  with raises_one_line(errors.ConfigError, "data.validation_fraction=1.5"):
    split.validation_keys(["a", "b"], 1.5)


def test_sotu_splits(sotu_dir):
  train = tfds.data_source("sotu", split="train", data_dir=sotu_dir)
  validation = tfds.data_source("sotu", split="validation", data_dir=sotu_dir)
  train_titles = [train[i]["title"] for i in range(len(train))]
  val_titles = [validation[i]["title"] for i in range(len(validation))]
  assert isinstance(train_titles[0], bytes) and isinstance(train[0]["text"], bytes)
  stems = [os.path.basename(p)[:-4] for p in sotu.speech_files()]
  assert len(stems) == 249
  assert sorted(t.decode() for t in train_titles + val_titles) == sorted(stems)  # disjoint and complete
  assert {t.decode() for t in val_titles} == {s for s in stems if _reference_is_validation(s, 0.05)}
  assert len(val_titles) == 11 and len(train_titles) == 238


def test_sotu_documents_are_cleaned_file_texts(sotu_dir):
  cfg = _data_config(data_dir=sotu_dir)
  validation = load_documents(cfg, "validation")
  files = {os.path.basename(p)[:-4]: p for p in sotu.speech_files()}
  expected = [clean_text(open(files[s], encoding="utf-8").read())
              for s in sorted(s for s in files if _reference_is_validation(s, 0.05))]
  assert validation == expected
  train = load_documents(cfg, "train")
  assert all("[Laughter]" not in d and "[Applause]" not in d and "  " not in d for d in train)
  assert 10_000_000 < sum(len(d) for d in train) < 13_000_000


def test_sotu_is_prepared_once(sotu_dir, monkeypatch):
  info = os.path.join(sotu_dir, "sotu", "1.0.0", "dataset_info.json")
  mtime = os.path.getmtime(info)

  def fail(*args, **kwargs):
    raise AssertionError("rebuilt a prepared dataset")

  monkeypatch.setattr(sotu.Sotu, "download_and_prepare", fail)
  assert len(load_documents(_data_config(data_dir=sotu_dir), "validation")) == 11
  assert os.path.getmtime(info) == mtime


def test_tfds_corpus_reads_a_prepared_dataset(sotu_dir):
  cfg = _data_config(corpus="tfds", tfds_name="sotu", data_dir=sotu_dir)
  assert load_documents(cfg, "validation") == load_documents(_data_config(data_dir=sotu_dir), "validation")


@pytest.mark.parametrize("name", ["lm1b", "imdb_reviews", "no_such_dataset_xyz"])
def test_tfds_not_prepared_fails_fast(tmp_path, name):
  cfg = _data_config(corpus="tfds", tfds_name=name, data_dir=str(tmp_path))
  start = time.perf_counter()
  # The command that prepares it is the point: the run cannot download it itself.
  with raises_one_line(errors.DataError, repr(name), f"data_dir={str(tmp_path)!r}",
                       f"tfds build {name} --file_format=array_record --data_dir={tmp_path}"):
    load_documents(cfg, "train")
  assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("overrides, kind, fragments", [
    ({"tfds_name": ""}, errors.ConfigError, ("data.corpus='tfds'", "--config.data.tfds_name")),
    ({"tfds_validation_split": "test"}, errors.DataError, ("data.tfds_validation_split='test'", "'sotu'",
                                                           "['train', 'validation']")),
    ({"tfds_text_key": "body"}, errors.DataError, ("data.tfds_text_key='body'", "'sotu'", "['text', 'title']")),
])
def test_tfds_config_errors(sotu_dir, overrides, kind, fragments):
  cfg = _data_config(**{"corpus": "tfds", "tfds_name": "sotu", "data_dir": sotu_dir, **overrides})
  with raises_one_line(kind, *fragments):
    load_documents(cfg, "validation")


def _write(directory, name: str, content) -> str:
  path = os.path.join(directory, name)
  with open(path, "wb" if isinstance(content, bytes) else "w", encoding=None if isinstance(content, bytes) else
            "utf-8") as f:
    f.write(content)
  return path


def test_text_files_split_by_path_hash(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Relative globs give relative paths, so the split below is the same every run.
  for i in range(30):
    _write(tmp_path, f"doc{i:02d}.txt", f"Document {i}.\n\n[Applause] Second  paragraph {i}.")
  _write(tmp_path, "notes.md", "Markdown file.")
  cfg = _data_config(corpus="text_files", text_files="*.txt, *.md", validation_fraction=0.2)
  train, validation = load_documents(cfg, "train"), load_documents(cfg, "validation")
  paths = sorted(glob.glob("*.txt") + glob.glob("*.md"))
  texts = {p: clean_text(open(p, encoding="utf-8").read()) for p in paths}
  assert validation == [texts[p] for p in paths if _reference_is_validation(p, 0.2)]
  assert train == [texts[p] for p in paths if not _reference_is_validation(p, 0.2)]
  assert len(validation) == 4 and texts["doc00.txt"] == "Document 0.\nSecond paragraph 0."


@pytest.mark.parametrize("num_files", [1, 2])
def test_few_text_files_split_by_paragraph(tmp_path, num_files):
  for i in range(num_files):
    _write(tmp_path, f"f{i}.txt", "\n".join(f"File {i} paragraph {j}." for j in range(40)))
  cfg = _data_config(corpus="text_files", text_files=f"{tmp_path}/*.txt", validation_fraction=0.05)
  train, validation = load_documents(cfg, "train"), load_documents(cfg, "validation")
  assert len(train) == len(validation) == num_files
  for i in range(num_files):
    assert validation[i] == f"File {i} paragraph 38.\nFile {i} paragraph 39."  # ceil(0.05 * 40) = 2
    assert train[i] + "\n" + validation[i] == "\n".join(f"File {i} paragraph {j}." for j in range(40))


def test_text_files_errors(tmp_path):
  missing = _data_config(corpus="text_files", text_files=f"{tmp_path}/*.txt")
  with raises_one_line(errors.DataError, f"data.text_files='{tmp_path}/*.txt'"):
    load_documents(missing, "train")

  _write(tmp_path, "a.txt", "[Applause]\n  \n")
  _write(tmp_path, "b.txt", "")
  with raises_one_line(errors.DataError, f"data.text_files='{tmp_path}/*.txt'", "no text"):
    load_documents(missing, "train")

  _write(tmp_path, "c.txt", "one paragraph only")
  with raises_one_line(errors.DataError, f"data.text_files='{tmp_path}/*.txt'", "validation"):
    load_documents(missing, "train")

  bad = _write(tmp_path, "d.txt", "caf\u00e9 ok\n".encode() + b"then \xff bad")
  with raises_one_line(errors.DataError, bad, "UTF-8", "0xff", "offset 14"):
    load_documents(missing, "train")


def test_byte_order_mark_is_dropped(tmp_path):
  path = _write(tmp_path, "bom.txt", b"\xef\xbb\xbfhello")
  assert read_utf8(path) == "hello"


def test_unknown_corpus_and_split():
  with raises_one_line(errors.ConfigError, "data.corpus='wiki'", "sotu, text_files, tfds, mixture, sft"):
    load_documents(_data_config(corpus="wiki"), "train")
  with raises_one_line(ValueError, "split='test'"):  # a caller's mistake, not the user's
    load_documents(_data_config(), "test")
