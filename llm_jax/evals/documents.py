"""Held-out loss, perplexity and bits per byte on whole documents, and the evaluation sets run during training.

These are `doc_loss` / `doc_perplexity` / `bits_per_byte`, not the trainer's `val_loss` / `val_perplexity`:
the trainer scores the packed validation rows (documents joined as [bos] + ids + [eos] and cut into rows;
the first token of a row is never a target, EOS is), which is cheap and comparable from step
to step of one run; the metrics here score every document alone, each of its tokens exactly once, so they
are comparable across runs, window lengths and (through bits per byte) tokenizers.

What is scored: each document is tokenised alone and read as [c] + ids, where c is BOS (or EOS for
tokenizers without one, GPT-2's document separator); every id of the document is a target exactly once
and nothing else is (no BOS, no EOS target). So the scored tokens are exactly the document's text and
bits per byte = total NLL (nats) / ln 2 / UTF-8 bytes of the documents, comparable across vocabularies.
(The packed training rows are not used: packing drops the first token of every row as a target.)
Documents longer than the window are read in windows of `seq_len` tokens that advance by `stride`
tokens; each window scores only its last `stride` targets (all of them in the first window), so with
stride < seq_len every target but the first `seq_len` sees at least seq_len - stride tokens of context.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any
from typing import Sequence

import jax.numpy as jnp

from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import metrics as metrics_lib
from llm_jax import paths
from llm_jax import workdir as workdir_lib
from llm_jax.data import corpus
from llm_jax.data.text import clean_text
from llm_jax.data.text import read_utf8
from llm_jax.data.text import text_file_paths
from llm_jax.evals import scoring
from llm_jax.model_config import ModelConfig


@dataclasses.dataclass(frozen=True, eq=False)
class Windows:
  """Scoring rows cut from tokenised documents, with the documents' size."""

  rows: scoring.Rows
  num_documents: int
  num_bytes: int


def document_windows(ids: Sequence[int], start_id: int, seq_len: int, stride: int) -> list[tuple[list[int], int]]:
  """(window tokens, number of targets to score at its end) covering every id of one document once."""
  seq = [start_id, *ids]
  n = len(ids)
  first_end = min(seq_len, n)
  windows = [(seq[:first_end + 1], first_end)]
  scored = first_end
  while scored < n:
    end = min(scored + stride, n)
    begin = max(0, end - seq_len)
    windows.append((seq[begin:end + 1], end - scored))
    scored = end
  return windows


def make_windows(documents: Sequence[str], tokenizer: Any, seq_len: int, stride: int) -> Windows:
  """Tokenises `documents` and lays their windows out as fixed-length scoring rows."""
  if not 1 <= stride <= seq_len:
    raise errors.ConfigError(f"--stride={stride} must be between 1 and the window --seq_len={seq_len}")
  start_id = scoring.conditioning_id(tokenizer)
  windows = [w for ids in tokenizer.encode_batch(list(documents)) if ids
             for w in document_windows(ids, start_id, seq_len, stride)]
  if not windows:
    raise errors.DataError("there is no text to evaluate: every document is empty")
  rows = scoring.layout_rows(windows, seq_len)
  num_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
  return Windows(rows=rows, num_documents=len(documents), num_bytes=num_bytes)


def text_metrics(nll_sum: float, tokens: float, num_bytes: int) -> dict[str, float]:
  """doc_loss (nats per token), doc_perplexity = exp(doc_loss), and bits per byte = nll_sum / ln 2 / bytes."""
  loss = nll_sum / max(tokens, 1.0)
  return {"doc_loss": loss, "doc_perplexity": metrics_lib.perplexity(loss),
          "bits_per_byte": nll_sum / math.log(2) / max(num_bytes, 1), "tokens": tokens, "bytes": float(num_bytes)}


def evaluate_windows(params: Any, cfg: ModelConfig, windows: Windows, batch_size: int) -> dict[str, float]:
  """Scores every window; tokens/s counts scored tokens over the run after compilation."""
  padded = scoring.pad_rows(windows.rows, batch_size)
  first = {k: jnp.asarray(v[:batch_size]) for k, v in padded.items()}
  scoring.score_rows(params, first, cfg=cfg)["nll"].block_until_ready()  # compile outside the timing
  start = time.perf_counter()
  scores = scoring.score_all(params, cfg, windows.rows, batch_size)
  seconds = time.perf_counter() - start
  out = text_metrics(float(scores["nll"].sum()), float(scores["tokens"].sum()), windows.num_bytes)
  out.update({"accuracy": float(scores["correct"].sum()) / max(out["tokens"], 1.0),
              "documents": float(windows.num_documents), "tokens_per_s": out["tokens"] / max(seconds, 1e-9),
              "seconds": seconds})
  return out


def evaluate_documents(params: Any, cfg: ModelConfig, tokenizer: Any, documents: Sequence[str], *,
                       seq_len: int, stride: int = 0, batch_size: int = 8) -> dict[str, float]:
  """doc_loss, doc_perplexity, bits per byte, tokens and tokens/s of the model on `documents` (stride 0: seq_len)."""
  check_seq_len(cfg, seq_len)
  windows = make_windows(documents, tokenizer, seq_len, stride or seq_len)
  return evaluate_windows(params, cfg, windows, batch_size)


def check_seq_len(cfg: ModelConfig, seq_len: int) -> None:
  if seq_len < 1 or (cfg.position_limit and seq_len > cfg.position_limit):
    raise errors.ConfigError(f"--seq_len={seq_len} must be between 1 and the model's {cfg.position_limit} positions")


def text_files_documents(pattern: str) -> list[str]:
  """Each file of the comma-separated globs as one whole document, cleaned as training corpora are."""
  paths = text_file_paths(pattern, "--text_files")
  documents = [doc for doc in (clean_text(read_utf8(p)) for p in paths) if doc]
  if not documents:
    raise errors.DataError(f"--text_files={pattern!r} has no text left after cleaning")
  return documents


def default_seq_len(workdir: str, cfg: ModelConfig) -> int:
  """The run's data.seq_len when its config.json says, else the model's positions (at most 1024)."""
  has_config = workdir_lib.has_run_config(workdir)
  seq_len = workdir_lib.read_run_config(workdir)["data"]["seq_len"] if has_config else min(cfg.max_len, 1024)
  return min(seq_len, cfg.position_limit or seq_len)


def evaluate_workdir(workdir: str, *, step: int | None = None, split: str = "validation", text_files: str = "",
                     seq_len: int = 0, stride: int = 0, batch_size: int = 8) -> dict[str, Any]:
  """Text metrics of checkpoint `step` (default newest) on the run's `split` or on `text_files`."""
  loaded = workdir_lib.load_model(workdir, step)
  if text_files:
    split, documents = "text_files", text_files_documents(text_files)
  else:
    if not workdir_lib.has_run_config(workdir):
      raise errors.MissingFileError(f"{workdir_lib.path(workdir, workdir_lib.RUN_CONFIG_FILE)} is missing, so the "
                                    "validation split is unknown; pass --text_files=<glob>")
    documents = corpus.load_documents(config_lib.data_from_record(workdir_lib.read_run_config(workdir)), split)
  seq_len = seq_len or default_seq_len(workdir, loaded.cfg)
  metrics = evaluate_documents(loaded.params, loaded.cfg, loaded.tokenizer, documents, seq_len=seq_len,
                               stride=stride, batch_size=batch_size)
  return {"workdir": workdir, "checkpoint_step": loaded.step, "split": split, "seq_len": seq_len,
          "stride": stride or seq_len, **metrics}


def zero_shot_workdir(workdir: str, path: str, *, step: int | None = None, batch_size: int = 8) -> dict[str, Any]:
  """Zero-shot accuracies of checkpoint `step` on a JSONL file, with every item's scores."""
  loaded = workdir_lib.load_model(workdir, step)
  items = scoring.read_items(path)
  result = scoring.zero_shot(loaded.params, loaded.cfg, loaded.tokenizer, items, batch_size)
  return {"workdir": workdir, "checkpoint_step": loaded.step, "zero_shot_file": path, "items": len(items),
          **result.accuracies(), **dataclasses.asdict(result)}


def write_report(path: str, report: dict[str, Any]) -> None:
  paths.makedirs(os.path.dirname(paths.absolute(path)))
  paths.as_path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


class TrainingEvaluator:
  """The extra evaluation sets of a training run, read and tokenised once, scored on demand.

  `text_sets` maps a name to documents (doc_loss, doc_perplexity, bits_per_byte); `zero_shot_files` are JSONL
  paths. Calling it returns flat metrics: 'eval/<name>/<metric>' and 'zero_shot/<stem>/<metric>'.
  """

  def __init__(self, cfg: ModelConfig, tokenizer: Any, *, text_sets: dict[str, Sequence[str]],
               zero_shot_files: Sequence[str], seq_len: int, batch_size: int = 8):
    check_seq_len(cfg, seq_len)
    self.cfg, self.batch_size = cfg, batch_size
    self.windows = {name: make_windows(docs, tokenizer, seq_len, seq_len) for name, docs in text_sets.items()}
    self.choice_sets = {}
    for path in zero_shot_files:
      items = scoring.read_items(path)
      rows = scoring.make_choice_rows(items, tokenizer, cfg.max_len)
      self.choice_sets[os.path.splitext(os.path.basename(path))[0]] = (items, rows)

  def __call__(self, params: Any) -> dict[str, float]:
    out = {}
    for name, windows in self.windows.items():
      scores = scoring.score_all(params, self.cfg, windows.rows, self.batch_size)
      m = text_metrics(float(scores["nll"].sum()), float(scores["tokens"].sum()), windows.num_bytes)
      out.update({f"eval/{name}/{k}": m[k] for k in ("doc_loss", "doc_perplexity", "bits_per_byte")})
    for name, (items, rows) in self.choice_sets.items():
      result = scoring.choose(items, scoring.score_all(params, self.cfg, rows, self.batch_size))
      out.update({f"zero_shot/{name}/{k}": v for k, v in result.accuracies().items()})
    return out
