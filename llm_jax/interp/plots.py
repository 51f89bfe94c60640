"""The inspection's pictures (matplotlib, Agg): text shaded token by token, attention grids, the logit-lens table."""

from __future__ import annotations

import math
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
from matplotlib import colors as mcolors  # noqa: E402  pylint: disable=wrong-import-position
from matplotlib.collections import PatchCollection  # noqa: E402  pylint: disable=wrong-import-position
from matplotlib.patches import Rectangle  # noqa: E402  pylint: disable=wrong-import-position

FONT = "DejaVu Sans Mono"  # ships with matplotlib: the same on every machine, one width for every character
COLUMNS = 96  # characters per line of shaded text
CELL_W, CELL_H = 0.075, 0.19  # inches per character cell at FONT_SIZE
FONT_SIZE = 9
MAX_TEXT_TOKENS = 2000  # the PNG shows at most this many tokens; the HTML page shows them all
LABEL_TOKENS = 48  # attention maps carry token labels up to this many tokens
LENS_COLUMNS = 16  # logit-lens positions per table block
LENS_BLOCKS = 3


def display(piece: str, limit: int = 0) -> str:
  """A token as a label: whitespace made visible, cut to `limit` characters (0: whole)."""
  shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in piece.replace("\n", "↵").replace(" ", "·"))
  return shown if not limit or len(shown) <= limit else shown[:limit - 1] + "…"


def layout(pieces: Sequence[str], columns: int) -> list[tuple[int, int, int, str]]:
  """(token, row, column, character) of every shown character: words wrap whole, newlines break lines (shown as
  ↵ so that a newline token has a cell of its own)."""
  cells, row, col = [], 0, 0
  for t, piece in enumerate(pieces):
    visible = len(piece.replace("\n", "↵"))
    if col and col + visible > columns and visible <= columns:
      row, col = row + 1, 0
    for ch in piece:
      if col >= columns:
        row, col = row + 1, 0
      cells.append((t, row, col, "↵" if ch == "\n" else ch if ch.isprintable() else "\ufffd"))
      col += 1
      if ch == "\n":
        row, col = row + 1, 0
  return cells


def shaded_text(path: str, pieces: Sequence[str], values: np.ndarray, *, title: str, cmap: str,
                norm: mcolors.Normalize, label: str) -> None:
  """The text with each token's cells shaded by its value, a colour bar beside it."""
  shown = min(len(pieces), MAX_TEXT_TOKENS)
  if shown < len(pieces):
    title += f" (first {shown:,} of {len(pieces):,} tokens)"
  cells = layout(pieces[:shown], COLUMNS)
  rows = (cells[-1][1] + 1) if cells else 1
  width, height = COLUMNS * CELL_W + 1.4, rows * CELL_H + 0.45  # inches: text, colour bar, title
  fig = plt.figure(figsize=(width, height))
  ax = fig.add_axes((0.15 / width, 0.08 / height, COLUMNS * CELL_W / width, rows * CELL_H / height))
  colormap = plt.get_cmap(cmap)
  boxes, shades = [], []
  for t, r, c, ch in cells:
    boxes.append(Rectangle((c, r + 0.06), 1.0, 0.88))
    shades.append(colormap(norm(values[t])))
    if ch != " ":
      dark = np.dot(mcolors.to_rgb(shades[-1]), (0.299, 0.587, 0.114)) < 0.5
      ax.text(c + 0.5, r + 0.5, ch, ha="center", va="center", family=FONT, fontsize=FONT_SIZE,
              color="white" if dark else "black")
  # A thin white line before each token's first cell shows where one token ends and the next begins.
  starts = [(c, r) for i, (t, r, c, _) in enumerate(cells) if i == 0 or cells[i - 1][0] != t]
  ax.add_collection(PatchCollection(boxes, facecolors=shades, edgecolors="none", zorder=0))
  ax.vlines([c for c, _ in starts], [r + 0.06 for _, r in starts], [r + 0.94 for _, r in starts], colors="white",
            linewidth=0.8, zorder=1)
  ax.set_xlim(0, COLUMNS)
  ax.set_ylim(rows, 0)
  ax.axis("off")
  ax.set_title(title, fontsize=10, loc="left")
  bar_ax = fig.add_axes((1 - 1.0 / width, 0.08 / height, 0.12 / width, rows * CELL_H / height))
  fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=colormap), cax=bar_ax, label=label)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


LOSS_CMAP, DIFFERENCE_CMAP = "YlOrRd", "RdBu_r"


def loss_norm(nll: np.ndarray) -> mcolors.Normalize:
  """Loss shading: white at 0, darkest at the 99th percentile (at least 1 nat)."""
  return mcolors.Normalize(0.0, max(float(np.percentile(nll, 99)), 1.0))


def difference_norm(diff: np.ndarray) -> mcolors.Normalize:
  """Difference shading: white at 0, darkest at the 99th percentile of |difference| on either side."""
  bound = max(float(np.percentile(np.abs(diff), 99)), 1e-6)
  return mcolors.TwoSlopeNorm(0.0, -bound, bound)


def shade(cmap: str, norm: mcolors.Normalize, value: float) -> str:
  """The colour (#rrggbb) a value gets in the pictures, for the HTML pages."""
  return mcolors.to_hex(plt.get_cmap(cmap)(norm(value)))


def loss_picture(path: str, pieces: Sequence[str], nll: np.ndarray, title: str) -> None:
  """Per-token loss (nats), shaded from white to dark red."""
  shaded_text(path, pieces, nll, title=title, cmap=LOSS_CMAP, norm=loss_norm(nll), label="loss (nats)")


def difference_picture(path: str, pieces: Sequence[str], diff: np.ndarray, title: str) -> None:
  """Per-token loss difference, red where the compared model's loss is higher, blue where lower."""
  shaded_text(path, pieces, diff, title=title, cmap=DIFFERENCE_CMAP, norm=difference_norm(diff),
              label="loss difference (nats)")


def attention_picture(path: str, maps_HxMxM: np.ndarray, labels: Sequence[str], title: str,
                      panel_titles: Sequence[str]) -> None:
  """One panel per head, query (rows) by key (columns), log-scaled; masked (zero) entries left white."""
  h, m = maps_HxMxM.shape[0], maps_HxMxM.shape[-1]
  labelled = m <= LABEL_TOKENS
  cols = min(h, 2 if labelled else 4)  # labelled panels need room: two across
  rows = math.ceil(h / cols)
  side = 5.5 if labelled else 3.4
  fig, axes = plt.subplots(rows, cols, figsize=(cols * side + 1.0, rows * side + 0.5), squeeze=False,
                           layout="constrained")
  norm = mcolors.LogNorm(vmin=1e-3, vmax=1.0)
  cmap = plt.get_cmap("viridis").with_extremes(bad="white", under=plt.get_cmap("viridis")(0.0))
  image = None
  for i, ax in enumerate(axes.flat):
    if i >= h:
      ax.axis("off")
      continue
    masked = np.ma.masked_equal(maps_HxMxM[i], 0.0)
    image = ax.imshow(masked, norm=norm, cmap=cmap, interpolation="nearest")
    ax.set_title(panel_titles[i], fontsize=8)
    if labelled:
      ticks = [display(s, 10) for s in labels]
      ax.set_xticks(range(m), ticks, rotation=90, fontsize=6, family=FONT)
      ax.set_yticks(range(m), ticks, fontsize=6, family=FONT)
    else:
      ax.set_xlabel("key position", fontsize=7)
      ax.set_ylabel("query position", fontsize=7)
      ax.tick_params(labelsize=6)
  fig.suptitle(title, fontsize=10)
  fig.colorbar(image, ax=axes, shrink=0.6, label="attention probability (log scale)")
  fig.savefig(path, dpi=100)
  plt.close(fig)


def lens_picture(path: str, cells_MxP: Sequence[Sequence[str]], probs_MxP: np.ndarray, hits_MxP: np.ndarray,
                 inputs: Sequence[str], targets: Sequence[str], row_names: Sequence[str], title: str) -> None:
  """A table per block of LENS_COLUMNS positions: each layer's top token (shaded by its probability, boxed when it
  is the actual next token), the input token above and the target below."""
  m, p = probs_MxP.shape
  blocks = [range(s, min(s + LENS_COLUMNS, p)) for s in range(0, p, LENS_COLUMNS)]
  fig, axes = plt.subplots(len(blocks), 1, figsize=(LENS_COLUMNS * 0.78 + 1.6, len(blocks) * (m + 2) * 0.26 + 0.8),
                           squeeze=False)
  cmap, norm = plt.get_cmap("Blues"), mcolors.Normalize(0.0, 1.0)
  for ax, block in zip(axes[:, 0], blocks):
    for j, pos in enumerate(block):
      ax.text(j + 0.5, -0.5, display(inputs[pos], 8), ha="center", va="center", fontsize=6, family=FONT,
              weight="bold")
      ax.text(j + 0.5, m + 0.5, display(targets[pos], 8), ha="center", va="center", fontsize=6, family=FONT,
              color="darkgreen")
      for i in range(m):
        shade = cmap(norm(probs_MxP[i, pos]) * 0.85)
        ax.add_patch(Rectangle((j, i), 1, 1, facecolor=shade, edgecolor="darkgreen" if hits_MxP[i, pos] else "white",
                               linewidth=1.6 if hits_MxP[i, pos] else 0.5))
        ax.text(j + 0.5, i + 0.5, display(cells_MxP[i][pos], 8), ha="center", va="center", fontsize=6, family=FONT,
                color="white" if probs_MxP[i, pos] > 0.6 else "black")
    ax.set_xlim(0, LENS_COLUMNS)
    ax.set_ylim(m + 1, -1)
    ax.set_yticks([-0.5, *[i + 0.5 for i in range(m)], m + 0.5], ["input", *row_names, "target"], fontsize=7)
    ax.set_xticks([j + 0.5 for j in range(len(block))], [str(pos) for pos in block], fontsize=6)
    ax.tick_params(length=0)
    for side in ax.spines.values():
      side.set_visible(False)
  axes[0, 0].set_title(title, fontsize=10, loc="left")
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
