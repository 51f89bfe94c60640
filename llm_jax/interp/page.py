"""The inspection's HTML pages: the text token by token, shaded, with exact values and top predictions on hover."""

from __future__ import annotations

import html
import math
from typing import Any
from typing import Sequence

STYLE = """
body { font-family: sans-serif; max-width: 70em; margin: 1em auto; }
.text { font-family: "DejaVu Sans Mono", monospace; white-space: pre-wrap; line-height: 1.7; font-size: 14px; }
.tok { border-left: 1px solid white; border-radius: 2px; }
.tok:hover { outline: 1px solid black; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
img { max-width: 100%; }
"""


def token_spans(pieces: Sequence[str], shades: Sequence[str], tips: Sequence[str]) -> str:
  """One <span> per token: its text, its shade, and `tips` shown on hover (the title attribute)."""
  return "".join(f'<span class="tok" style="background:{s}" title="{html.escape(tip)}">{html.escape(p)}</span>'
                 for p, s, tip in zip(pieces, shades, tips))


def prediction_tip(index: int, piece: str, nll: float, top: Sequence[tuple[str, float]]) -> str:
  """'token 12 ' the': loss 3.2134 nats (p = 0.0402)' and the top predictions, one a line."""
  lines = [f"token {index} {piece!r}: loss {nll:.4f} nats (p = {math.exp(-nll):.4f})", "top-5:"]
  lines += [f"  {p!r} {prob:.4f}" for p, prob in top]
  return "\n".join(lines)


def table(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  """An HTML table of `records` (floats to 3 decimals)."""
  def cell(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))
  head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
  body = "".join("<tr>" + "".join(f"<td>{cell(r[c])}</td>" for c in columns) + "</tr>" for r in records)
  return f"<table><tr>{head}</tr>{body}</table>"


def document(title: str, summary_lines: Sequence[str], spans: str, sections: Sequence[tuple[str, str]]) -> str:
  """A whole page: title, summary paragraphs, the shaded text, then (heading, HTML) sections."""
  summary = "".join(f"<p>{html.escape(line)}</p>" for line in summary_lines)
  rest = "".join(f"<h2>{html.escape(h)}</h2>{body}" for h, body in sections)
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
          f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{summary}"
          f'<div class="text">{spans}</div>{rest}</body></html>\n')


def image(src: str, alt: str) -> str:
  return f'<p><img src="{html.escape(src)}" alt="{html.escape(alt)}"></p>'
