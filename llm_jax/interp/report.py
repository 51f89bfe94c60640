"""Writes an inspection into one folder: the pictures, the HTML pages and summary.json (every figure they show)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from llm_jax import metrics as metrics_lib
from llm_jax.interp import analysis
from llm_jax.interp import page
from llm_jax.interp import plots

TOKENS_PNG, TOKENS_HTML, LENS_PNG, HEADS_TXT, SUMMARY_JSON = (
    "tokens.png", "tokens.html", "lens.png", "attention_heads.txt", "summary.json")
COMPARE_PNG, COMPARE_HTML = "compare.png", "compare.html"
HEAD_COLUMNS = ("layer", "head", "kind", *analysis.HEAD_STATS)
# Why the per-head figures read as they do, written under the table.
HEAD_LEGEND = ("Means over the scored queries (the first slot of each window left out): entropy of the attention "
               "(nats) against uniform_entropy, that of attending evenly to every visible key; first: weight on the "
               "window's first token (the conditioning token in the first window); previous / self: weight on the "
               f"token just before / the query itself; local: weight on the query and the {analysis.LOCAL_KEYS - 1} "
               "tokens before it; distance: mean query-key distance in tokens.")


def attention_file(layer: int) -> str:
  return f"attention_layer{layer}.png"


class Vocabulary:
  """Vocabulary ids as readable text (a leading space kept), cached."""

  def __init__(self, tokenizer: Any):
    self._tokenizer, self._cache = tokenizer, {}

  def __call__(self, token_id: int) -> str:
    token_id = int(token_id)
    if token_id not in self._cache:
      raw = self._tokenizer.id_to_piece(token_id)
      text = self._tokenizer.decode([token_id])
      # A byte or a control token decodes to nothing readable: its vocabulary piece says more.
      if not text or not text.replace("\n", "").isprintable() or "\ufffd" in text:
        text = raw
      spaced = raw[:1] in ("▁", "Ġ") and not text.startswith(" ")
      self._cache[token_id] = " " + text if spaced else text
    return self._cache[token_id]


def heads_text(records: list[dict[str, Any]]) -> str:
  """The per-head table as aligned text, with its legend."""
  lines = ["".join(f"{c:>16}" for c in HEAD_COLUMNS)]
  lines += ["".join(f"{r[c]:>16.3f}" if isinstance(r[c], float) else f"{r[c]:>16}" for c in HEAD_COLUMNS)
            for r in records]
  return "\n".join(lines) + "\n\n" + HEAD_LEGEND + "\n"


def _attention_pictures(out_dir: str, ins: analysis.Inspection, records: list[dict[str, Any]], what: str) -> list[str]:
  files = []
  heads = ins.maps.shape[1]
  for layer in range(ins.maps.shape[0]):
    titles = [f"head {h}: {r['kind']}\nentropy {r['entropy']:.2f} first {r['first']:.2f} prev {r['previous']:.2f}"
              for h, r in enumerate(records[layer * heads:(layer + 1) * heads])]
    name = attention_file(layer + 1)
    plots.attention_picture(os.path.join(out_dir, name), ins.maps[layer], ins.map_labels,
                            f"{what}: layer {layer + 1} attention, first window ({ins.maps.shape[-1]} tokens)", titles)
    files.append(name)
  return files


def _lens_picture(out_dir: str, ins: analysis.Inspection, vocab: Vocabulary, what: str) -> None:
  p = min(len(ins.ids), plots.LENS_COLUMNS * plots.LENS_BLOCKS)
  cells = [[vocab(t) for t in row[:p]] for row in ins.lens_ids]
  hits = ins.lens_ids[:, :p] == ins.ids[None, :p]
  inputs = [ins.map_labels[0], *ins.pieces[:p - 1]]
  names = ["embedding", *[f"layer {i}" for i in range(1, len(ins.lens_ids))]]
  plots.lens_picture(os.path.join(out_dir, LENS_PNG), cells, ins.lens_probs[:, :p], hits, inputs, ins.pieces[:p],
                     names, f"{what}: logit lens, top token per layer (first {p} positions; boxed: the actual next "
                            "token)")


def loss_line(ins: analysis.Inspection) -> str:
  return (f"{len(ins.ids):,} tokens, {ins.num_bytes:,} bytes: mean loss {ins.mean_loss:.4f} nats "
          f"(perplexity {metrics_lib.perplexity(ins.mean_loss):.2f}), {ins.bits_per_byte:.4f} bits per byte "
          f"(windows of {ins.seq_len} tokens, stride {ins.stride}: {ins.windows} window(s))")


def write_inspection(out_dir: str, ins: analysis.Inspection, tokenizer: Any, meta: dict[str, Any]) -> dict[str, Any]:
  """Writes every picture and page of `ins`; returns the summary for `write_summary`. `meta` names the model
  (workdir, checkpoint_step, a note) and is copied into the summary."""
  os.makedirs(out_dir, exist_ok=True)
  vocab = Vocabulary(tokenizer)
  what = f"{os.path.basename(os.path.normpath(meta['workdir']))} step {meta['checkpoint_step']}"
  records = analysis.head_table(ins.heads)
  plots.loss_picture(os.path.join(out_dir, TOKENS_PNG), ins.pieces, ins.nll,
                     f"{what}: per-token loss; mean {ins.mean_loss:.3f} nats, {ins.bits_per_byte:.3f} bits/byte")
  files = [TOKENS_PNG, *_attention_pictures(out_dir, ins, records, what)]
  _lens_picture(out_dir, ins, vocab, what)
  with open(os.path.join(out_dir, HEADS_TXT), "w", encoding="utf-8") as f:
    f.write(heads_text(records))
  norm = plots.loss_norm(ins.nll)
  tips = [page.prediction_tip(i, p, float(v), [(vocab(t), float(q)) for t, q in zip(ids, probs)])
          for i, (p, v, ids, probs) in enumerate(zip(ins.pieces, ins.nll, ins.top_ids, ins.top_probs))]
  spans = page.token_spans(ins.pieces, [plots.shade(plots.LOSS_CMAP, norm, v) for v in ins.nll], tips)
  sections = [("Attention heads", page.table(records, HEAD_COLUMNS) + f"<p>{HEAD_LEGEND}</p>"),
              ("Pictures", "".join(page.image(f, f) for f in [*files, LENS_PNG]))]
  html_text = page.document(f"{what}: per-token loss", [loss_line(ins), meta.get("note", "")], spans, sections)
  with open(os.path.join(out_dir, TOKENS_HTML), "w", encoding="utf-8") as f:
    f.write(html_text)
  files += [LENS_PNG, HEADS_TXT, TOKENS_HTML, SUMMARY_JSON]
  summary = {**meta, "tokens": len(ins.ids), "bytes": ins.num_bytes, "mean_loss": ins.mean_loss,
             "perplexity": metrics_lib.perplexity(ins.mean_loss), "bits_per_byte": ins.bits_per_byte,
             "seq_len": ins.seq_len, "stride": ins.stride, "windows": ins.windows, "heads": records,
             "per_token": [{"piece": p, "loss": float(v)} for p, v in zip(ins.pieces, ins.nll)], "files": files}
  return summary


def write_summary(out_dir: str, summary: dict[str, Any]) -> None:
  with open(os.path.join(out_dir, SUMMARY_JSON), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)


def write_comparison(out_dir: str, a: analysis.Inspection, b: analysis.Inspection, name_a: str, name_b: str,
                     top: int) -> dict[str, Any]:
  """The per-token loss difference b - a (red: b's loss higher), as a picture and a page; returns the positions
  of the largest differences and both means."""
  diff = b.nll.astype(np.float64) - a.nll.astype(np.float64)
  title = f"loss of {name_b} minus {name_a}: mean {diff.mean():+.4f} nats (red: {name_b} worse)"
  plots.difference_picture(os.path.join(out_dir, COMPARE_PNG), a.pieces, diff, title)
  largest = [{"position": i, "piece": a.pieces[i], "context": "".join(a.pieces[max(0, i - 8):i]),
              "loss_a": float(a.nll[i]), "loss_b": float(b.nll[i]), "difference": float(diff[i])}
             for i in analysis.largest_differences(a.nll, b.nll, top)]
  norm = plots.difference_norm(diff)
  tips = [f"token {i} {p!r}: {name_a} {x:.4f}, {name_b} {y:.4f} nats, difference {d:+.4f}"
          for i, (p, x, y, d) in enumerate(zip(a.pieces, a.nll, b.nll, diff))]
  spans = page.token_spans(a.pieces, [plots.shade(plots.DIFFERENCE_CMAP, norm, d) for d in diff], tips)
  lines = [f"{name_a}: {loss_line(a)}", f"{name_b}: {loss_line(b)}"]
  body = page.table(largest, ("position", "context", "piece", "loss_a", "loss_b", "difference"))
  with open(os.path.join(out_dir, COMPARE_HTML), "w", encoding="utf-8") as f:
    f.write(page.document(title, lines, spans, [("Largest differences", body), ("Picture", page.image(
        COMPARE_PNG, COMPARE_PNG))]))
  return {"a": name_a, "b": name_b, "mean_loss_a": a.mean_loss, "mean_loss_b": b.mean_loss,
          "mean_difference": float(diff.mean()), "largest": largest, "files": [COMPARE_PNG, COMPARE_HTML]}
