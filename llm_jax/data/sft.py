"""Supervised fine-tuning data: prompt/completion or chat rows from JSONL or Parquet, rendered and tokenised with
per-token loss weights, split by row, and packed whole into rows with segment ids.

SFT sets are small beside pre-training corpora, so they stay in memory (`PackedRows` with weights) rather than going
through the token store; they are re-read and re-tokenised at every start (seconds for thousands of rows).

Row kinds (one JSON object per line, or one Parquet row):
  {"prompt": str, "completion": str}   plain text: [bos] + prompt + completion + [eos]; completion and eos count
  {"messages": [{"role", "content"}]}  rendered by the chat template (`llm_jax.chat`); assistant turns count
With `train_on_prompt` every token counts. A weight belongs to a token as a *target*: weights_L1[t] says whether
predicting token t counts, so `packing.make_example` takes weights_L1[..., 1:] as the loss mask.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
from typing import Any
from typing import Iterator
from typing import Sequence

import numpy as np

from llm_jax import chat
from llm_jax import errors
from llm_jax.data.split import validation_keys

PAD_ID = 0  # as packing.PAD_ID; padding has segment 0 and weight 0


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
  """One row's token ids and the loss weight of each id as a target; `where` names its file and row for messages,
  `key` (file name and row index) decides its split."""

  tokens: np.ndarray
  weights: np.ndarray
  where: str
  key: str = ""


def sft_paths(pattern: str) -> list[str]:
  """The files of comma-separated globs, sorted within each glob; each must end in .jsonl, .jsonl.gz or .parquet."""
  paths = []
  for part in filter(None, (p.strip() for p in pattern.split(","))):
    matched = sorted(glob.glob(os.path.expanduser(part)))
    if not matched:
      raise errors.DataError(f"data.sft_files={part!r} matches no files; pass an existing glob of .jsonl or .parquet "
                             "files")
    for path in matched:
      if not path.endswith((".jsonl", ".jsonl.gz", ".parquet")):
        raise errors.DataError(f"data.sft_files matches {path}, which is not .jsonl, .jsonl.gz or .parquet")
    paths.extend(matched)
  return paths


def read_rows(path: str) -> Iterator[tuple[str, Any]]:
  """(where, row) for each row of one file: 'FILE line N' for JSONL, 'FILE row N' for Parquet (1-based)."""
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel  (only Parquet sets need it)
    for number, row in enumerate(pq.read_table(path).to_pylist(), 1):
      yield f"{path} row {number}", row
    return
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        try:
          yield f"{path} line {number}", json.loads(line)
        except json.JSONDecodeError as e:
          raise errors.DataError(f"{path} line {number} is not JSON ({e.msg}); fix the file") from None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = min(len(a), len(b))
  return next((i for i in range(n) if a[i] != b[i]), n)


def tokens_and_weights(text: str, spans: Sequence[tuple[int, int]], tokenizer: Any) -> tuple[list[int], np.ndarray]:
  """`text` encoded once, with weight 1 on the tokens of the character `spans` and 0 elsewhere.

  A span boundary at character c falls after the tokens that `text[:c]` encodes to and `text` shares; a token that
  straddles a boundary goes to the later side. Encoding the whole text once keeps the ids exactly what the model
  sees when it reads the same text (no tokenizer artefacts at boundaries, e.g. sentencepiece's dummy prefix).
  """
  ids = tokenizer.encode(text)
  weights = np.zeros(len(ids), np.float32)

  def boundary(c: int) -> int:
    if c <= 0 or c >= len(text):
      return 0 if c <= 0 else len(ids)
    return _common_prefix(tokenizer.encode(text[:c]), ids)

  for start, end in spans:
    weights[boundary(start):boundary(end)] = 1.0
  return ids, weights


def render_row(row: Any, where: str, template: chat.ChatTemplate) -> tuple[str, list[tuple[int, int]], bool]:
  """(text, weighted spans, whether eos follows) of one row; one-line ValueErrors naming `where`."""
  if isinstance(row, dict) and row.get("messages") is not None and ("completion" in row or "prompt" in row):
    raise errors.DataError(f"{where} has both 'messages' and 'prompt'/'completion', which would be one of them "
                           "ignored; give each row one form")
  if isinstance(row, dict) and "completion" in row and not isinstance(row["completion"], str):
    raise errors.DataError(f"{where}: 'completion' must be a string, not {type(row['completion']).__name__}")
  if isinstance(row, dict) and row.get("messages") is not None:
    try:
      chat.check_messages(row["messages"])
      text, spans = template.assistant_spans(row["messages"])
    except chat.TemplateError as e:
      raise errors.DataError(f"{where}: {e}") from None
    return text, spans, False
  if isinstance(row, dict) and isinstance(row.get("completion"), str):
    prompt = row.get("prompt") or ""
    if not isinstance(prompt, str):
      raise errors.DataError(f"{where}: 'prompt' must be a string")
    return prompt + row["completion"], [(len(prompt), len(prompt) + len(row["completion"]))], True
  names = sorted(row) if isinstance(row, dict) else type(row).__name__
  raise errors.DataError(f"{where} has neither 'completion' nor 'messages' (it has {names}); give each row "
                         "{\"prompt\", \"completion\"} or {\"messages\": [...]}")


def make_example(row: Any, where: str, tokenizer: Any, template: chat.ChatTemplate, *, train_on_prompt: bool,
                 seq_len: int, key: str = "") -> Example:
  """One row as [bos] + ids (+ [eos]) with weights, cut to seq_len + 1 tokens; refuses a row left with none."""
  text, spans, add_eos = render_row(row, where, template)
  ids, weights = tokens_and_weights(text, spans, tokenizer)
  if tokenizer.bos_id >= 0 and not (ids and ids[0] == tokenizer.bos_id):
    ids, weights = [tokenizer.bos_id] + ids, np.concatenate([[0.0], weights])
  if add_eos:
    ids, weights = ids + [tokenizer.eos_id], np.concatenate([weights, [1.0]])
  if train_on_prompt:
    weights = np.ones_like(weights)
  tokens = np.asarray(ids[:seq_len + 1], np.int32)
  weights = np.asarray(weights[:seq_len + 1], np.float32)
  if not weights[1:].any():  # the first token is never a target
    raise errors.DataError(f"{where}: every token that would count lies past data.seq_len={seq_len} (the row has "
                           f"{len(ids)} tokens), so a batch of it would have no token to learn from; raise "
                           "--config.data.seq_len or shorten the prompt")
  return Example(tokens, weights, where, key)


def pack_examples(examples: Sequence[Example], seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Whole examples into rows of seq_len + 1 tokens, in order, a new row when the next one does not fit.

  Returns (tokens_NxL1, segment_ids_NxL1, weights_NxL1): segments number the examples of a row from 1; padding is
  PAD_ID with segment 0 and weight 0. No example is cut, so every row holds at least one counted target.
  """
  row_len = seq_len + 1
  rows: list[list[Example]] = [[]]
  used = 0
  for example in examples:
    if used + len(example.tokens) > row_len:
      rows.append([])
      used = 0
    rows[-1].append(example)
    used += len(example.tokens)
  tokens = np.full((len(rows), row_len), PAD_ID, np.int32)
  segment_ids = np.zeros((len(rows), row_len), np.int32)
  weights = np.zeros((len(rows), row_len), np.float32)
  for r, row in enumerate(rows):
    at = 0
    for segment, example in enumerate(row, 1):
      end = at + len(example.tokens)
      tokens[r, at:end], segment_ids[r, at:end], weights[r, at:end] = example.tokens, segment, example.weights
      at = end
  return tokens, segment_ids, weights


def load_examples(pattern: str, tokenizer: Any, template: chat.ChatTemplate, *, train_on_prompt: bool,
                  seq_len: int) -> list[Example]:
  """Every row of the files `pattern` names, as examples, in file and row order."""
  examples = [make_example(row, where, tokenizer, template, train_on_prompt=train_on_prompt, seq_len=seq_len,
                           key=f"{os.path.basename(path)}:{index}")
              for path in sft_paths(pattern) for index, (where, row) in enumerate(read_rows(path))]
  if len(examples) < 2:
    raise errors.DataError(f"data.sft_files={pattern!r} holds {len(examples)} row(s); train and validation need at "
                           "least 2")
  return examples


def split_examples(examples: Sequence[Example], fraction: float) -> tuple[list[Example], list[Example]]:
  """(train, validation) by a stable hash of each row's file name and row number (`split.validation_keys`)."""
  held_out = validation_keys([e.key for e in examples], fraction)
  return [e for e in examples if e.key not in held_out], [e for e in examples if e.key in held_out]
