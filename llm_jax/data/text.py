"""Text shared by every corpus: files by comma-separated globs (local or gs://), strict UTF-8 reads, and cleaning
(Unicode NFKC, stage-note removal and whitespace normalisation)."""

import re
import unicodedata

from llm_jax import errors
from llm_jax import paths

# A stage note such as "[Laughter]" or "[The President spoke in Spanish.]": one line, no nested brackets, and
# bounded in length so that a stray "[" can never swallow a paragraph of real text. The horizontal whitespace
# before the note goes with it, so "great [Applause]." becomes "great." rather than "great .".
_STAGE_NOTE_RE = re.compile(r"[^\S\n]*\[[^\[\]\n]{0,300}\]")
# Runs of spaces, tabs and other non-newline whitespace.
_HSPACE_RE = re.compile(r"[^\S\n]+")


def clean_text(text: str) -> str:
  """Returns `text` NFKC-normalised, without bracketed stage notes, one paragraph per line; "" if nothing is left.

  Lines are stripped, runs of horizontal whitespace become one space, empty lines are dropped, and paragraphs
  are joined by a single "\\n". The result is a fixed point: clean_text(clean_text(x)) == clean_text(x).
  """
  text = unicodedata.normalize("NFKC", text)
  # Removing "[a]" from "[[a]]" leaves "[]", so repeat until no note is left.
  text, count = _STAGE_NOTE_RE.subn("", text)
  removed = count
  while count:
    text, count = _STAGE_NOTE_RE.subn("", text)
  if removed:
    # A removal can bring a base letter next to a combining mark; compose them as NFKC would.
    text = unicodedata.normalize("NFKC", text)
  lines = (_HSPACE_RE.sub(" ", line).strip() for line in text.splitlines())
  return "\n".join(line for line in lines if line)


def read_utf8(path: str) -> str:
  """Returns the text of `path`; a ValueError names the file and byte offset if it is not UTF-8."""
  data = paths.as_path(path).read_bytes()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise errors.DataError(f"{path} is not valid UTF-8 (byte {data[e.start]:#04x} at byte offset {e.start}); "
                           f"convert it with `iconv -t UTF-8` or drop it from data.text_files") from None
  return text.removeprefix("\ufeff")  # A byte-order mark is not text.


def text_file_paths(pattern: str, setting: str, fix: str = "") -> list[str]:
  """The sorted files matched by comma-separated globs (`~` expanded, `**` recursive).

  `setting` names the flag in the error (e.g. "data.text_files"); `fix` ends its advice.
  """
  globs = [g.strip() for g in pattern.split(",") if g.strip()]
  found = {p for g in globs for p in paths.glob_files(g)}
  if not found:
    raise errors.DataError(f"{setting}={pattern!r} matches no files; pass an existing glob{fix}")
  return sorted(found)
