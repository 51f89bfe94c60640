"""Log-likelihoods of token rows under a model, and zero-shot multiple choice scored from JSONL items.

A zero-shot item is one JSON object per line: {"context": str, "choices": [str, ...], "label": int}.
Each choice is scored by log P(choice | context), summed over the choice's tokens ("sum") and divided
by their number ("norm", per token); the prediction under each is the best-scoring choice (ties go to
the lower index) and accuracy is the share of items whose prediction is the label. As in common
evaluation harnesses, whitespace that ends the context moves to the front of the choice, and the choice's
tokens are those of encode(context + choice) after encode(context), so word-initial spaces tokenise as
they would in running text.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from typing import Any
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import errors
from llm_jax import metrics as metrics_lib
from llm_jax import paths
from llm_jax.model import Transformer
from llm_jax.model_config import ModelConfig

Rows = dict[str, np.ndarray]
ROW_KEYS = ("inputs", "targets", "positions", "loss_mask")
# Row lengths are rounded up to a multiple of this, so files of similar lengths share one compiled program.
LENGTH_QUANTUM = 32


@dataclasses.dataclass(frozen=True)
class Item:
  context: str
  choices: tuple[str, ...]
  label: int


def read_items(path: str) -> list[Item]:
  """Parses a zero-shot JSONL file; a ValueError names the file, line and what is wrong."""
  if not paths.as_path(path).is_file():
    raise errors.MissingFileError(f"zero-shot file {path} does not exist; pass an existing JSONL file")
  items = []
  with paths.as_path(path).open("rb") as raw:
    for number, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8"), 1):
      if line.strip():
        items.append(_parse_item(line, f"{path}:{number}"))
  if not items:
    raise errors.DataError(f"zero-shot file {path} has no items")
  return items


def _parse_item(line: str, where: str) -> Item:
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise errors.DataError(f"{where}: not valid JSON ({e.msg})") from None
  if not isinstance(obj, dict):
    raise errors.DataError(f"{where}: expected an object with context, choices and label")
  context, choices, label = obj.get("context"), obj.get("choices"), obj.get("label")
  if not isinstance(context, str):
    raise errors.DataError(f"{where}: 'context' must be a string")
  if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
    raise errors.DataError(f"{where}: 'choices' must be a list of at least two non-empty strings")
  if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
    raise errors.DataError(f"{where}: 'label' must be an integer index into the {len(choices)} choices")
  return Item(context=context, choices=tuple(choices), label=label)


def conditioning_id(tokenizer: Any) -> int:
  """The token every scored sequence starts from: BOS, or EOS for tokenizers without one (GPT-2)."""
  return tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id


@functools.partial(jax.jit, static_argnames=("cfg",))
def score_rows(params: Any, rows: dict[str, jax.Array], *, cfg: ModelConfig) -> dict[str, jax.Array]:
  """Per row: summed NLL of the masked targets, their number, and how many were the model's argmax."""
  logits_BxLxV, _ = Transformer(cfg).apply({"params": params}, rows["inputs"], rows["positions"])
  per_row = jax.vmap(lambda l, t, m: metrics_lib.cross_entropy(l[None], t[None], m[None]))
  nll_B, tokens_B, correct_B = per_row(logits_BxLxV, rows["targets"], rows["loss_mask"])
  return {"nll": nll_B, "tokens": tokens_B, "correct": correct_B}


def pad_rows(rows: Rows, multiple: int) -> Rows:
  """Appends all-zero rows (loss_mask 0: they score nothing) up to a multiple of `multiple`."""
  n = len(rows["inputs"])
  extra = -n % multiple
  return {k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in rows.items()}


def score_all(params: Any, cfg: ModelConfig, rows: Rows, batch_size: int) -> dict[str, np.ndarray]:
  """`score_rows` over every row in fixed-size batches (one compiled program); float64 per-row results."""
  n = len(rows["inputs"])
  padded = pad_rows(rows, batch_size)
  outs = []
  for start in range(0, len(padded["inputs"]), batch_size):
    batch = {k: jnp.asarray(v[start:start + batch_size]) for k, v in padded.items()}
    outs.append(score_rows(params, batch, cfg=cfg))
  fetched = jax.device_get(outs)
  return {k: np.concatenate([o[k] for o in fetched]).astype(np.float64)[:n] for k in ("nll", "tokens", "correct")}


def _split_whitespace(context: str, choice: str) -> tuple[str, str]:
  stripped = context.rstrip()
  return stripped, context[len(stripped):] + choice


def encode_pair(tokenizer: Any, context: str, choice: str) -> tuple[list[int], list[int]]:
  """(context ids, choice ids): the choice's are what encode(context + choice) adds after the context's."""
  context, choice = _split_whitespace(context, choice)
  context_ids = tokenizer.encode(context)
  whole_ids = tokenizer.encode(context + choice)
  return context_ids, whole_ids[len(context_ids):]


def choice_sequence(tokenizer: Any, context: str, choice: str, start_id: int, max_len: int,
                    subject: str) -> tuple[list[int], int]:
  """([start] + context + choice ids, cut to the model's last max_len + 1 tokens; the choice's token count), for
  `layout_rows`; one-line errors name `subject` when the choice is empty or longer than the model reads."""
  context_ids, choice_ids = encode_pair(tokenizer, context, choice)
  if not choice_ids:
    raise errors.DataError(f"{subject} encodes to no tokens")
  if len(choice_ids) >= max_len:
    raise errors.DataError(f"{subject} has {len(choice_ids)} tokens; the model reads at most {max_len}")
  return ([start_id] + context_ids + choice_ids)[-(max_len + 1):], len(choice_ids)


def layout_rows(sequences: Sequence[tuple[Sequence[int], int]], length: int) -> Rows:
  """Rows of `length` positions from (token sequence, number of final targets to score) pairs."""
  rows = {k: np.zeros((len(sequences), length), np.float32 if k == "loss_mask" else np.int32) for k in ROW_KEYS}
  for r, (seq, scored) in enumerate(sequences):
    n = len(seq) - 1
    rows["inputs"][r, :n] = seq[:-1]
    rows["targets"][r, :n] = seq[1:]
    rows["positions"][r, :n] = np.arange(n)
    rows["loss_mask"][r, n - scored:n] = 1.0
  return rows


def make_choice_rows(items: Sequence[Item], tokenizer: Any, max_len: int) -> Rows:
  """One row per (item, choice): [conditioning token] + context + choice, targets masked to the choice.

  Contexts longer than the model's `max_len` positions lose their oldest tokens.
  """
  start_id = conditioning_id(tokenizer)
  sequences = []
  for i, item in enumerate(items):
    for j, choice in enumerate(item.choices):
      sequences.append(choice_sequence(tokenizer, item.context, choice, start_id, max_len,
                                       f"choice {j} of zero-shot item {i}"))
  longest = max(len(seq) - 1 for seq, _ in sequences)
  return layout_rows(sequences, min(max_len, -(-longest // LENGTH_QUANTUM) * LENGTH_QUANTUM))


@dataclasses.dataclass(frozen=True)
class ZeroShotResult:
  """Per-item log-likelihoods of each choice, predictions under both rules, and the accuracies."""

  log_likelihoods: list[list[float]]
  num_tokens: list[list[int]]
  predictions: list[int]
  predictions_norm: list[int]
  labels: list[int]

  @property
  def accuracy(self) -> float:
    return float(np.mean(np.equal(self.predictions, self.labels)))

  @property
  def accuracy_norm(self) -> float:
    return float(np.mean(np.equal(self.predictions_norm, self.labels)))

  def accuracies(self) -> dict[str, float]:
    return {"accuracy": self.accuracy, "accuracy_norm": self.accuracy_norm}


def choose(items: Sequence[Item], scores: dict[str, np.ndarray]) -> ZeroShotResult:
  """Predictions and accuracies from per-row scores laid out as `make_choice_rows` lays out the rows."""
  log_likelihoods, num_tokens, predictions, predictions_norm = [], [], [], []
  row = 0
  for item in items:
    k = len(item.choices)
    ll = -scores["nll"][row:row + k]
    count = scores["tokens"][row:row + k]
    row += k
    log_likelihoods.append([float(x) for x in ll])
    num_tokens.append([int(x) for x in count])
    predictions.append(int(np.argmax(ll)))
    predictions_norm.append(int(np.argmax(ll / count)))
  return ZeroShotResult(log_likelihoods, num_tokens, predictions, predictions_norm, [it.label for it in items])


def zero_shot(params: Any, cfg: ModelConfig, tokenizer: Any, items: Sequence[Item],
              batch_size: int = 8) -> ZeroShotResult:
  """Scores every choice of every item and picks the best under the summed and per-token rules."""
  rows = make_choice_rows(items, tokenizer, cfg.max_len)
  return choose(items, score_all(params, cfg, rows, batch_size))
