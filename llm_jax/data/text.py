"""Text cleaning shared by every corpus: Unicode NFKC, stage-note removal and whitespace normalisation."""

import re
import unicodedata

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
