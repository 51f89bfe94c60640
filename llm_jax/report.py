"""Sweep reports: per-run and per-variant results (mean ± std over seeds), a CSV, a Markdown table, plots.

A difference is marked as larger than the seed noise when the gap between a variant's mean final
validation loss and the best variant's exceeds twice the standard error of that difference,
2·sqrt(s_a²/n_a + s_b²/n_b) (about a 95% two-sided z-test; with two or three seeds, a rough guide).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position

from llm_jax import runcard
from llm_jax import sweeps
from llm_jax import writers

METRICS = ("final_val_loss", "best_val_loss", "tokens_per_s", "mfu", "wall_time_s", "num_params")


@dataclasses.dataclass
class RunResult:
  run: sweeps.Run
  values: dict[str, float]
  val_curve: list[tuple[int, float]]


def collect_run(run: sweeps.Run) -> RunResult | None:
  """A finished run's numbers from its metrics.jsonl and run.json; None if it has none yet."""
  records = writers.read_metrics(run.workdir)
  curve = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
  card = runcard.read(run.workdir)
  if not curve or card is None:
    return None
  # Throughput: median over log lines, leaving out the first (it includes compilation).
  speed = [r for r in records if "tokens_per_s" in r][1:] or [r for r in records if "tokens_per_s" in r]
  values = {
      "final_val_loss": curve[-1][1],
      "best_val_loss": min(v for _, v in curve),
      "tokens_per_s": float(np.median([r["tokens_per_s"] for r in speed])) if speed else math.nan,
      "mfu": float(np.median([r["mfu"] for r in speed])) if speed else math.nan,
      "wall_time_s": float(card.get("wall_time_s", math.nan)),
      "num_params": float(card.get("num_params", math.nan)),
  }
  return RunResult(run=run, values=values, val_curve=curve)


def aggregate(results: list[RunResult]) -> list[dict[str, Any]]:
  """One row per variant: n seeds, mean and sample std of every metric, and the noise marking."""
  by_variant: dict[str, list[RunResult]] = {}
  for r in results:
    by_variant.setdefault(r.run.variant, []).append(r)
  rows = []
  for variant, group in by_variant.items():
    row: dict[str, Any] = {"variant": variant, "n": len(group), **group[0].run.point}
    for m in METRICS:
      xs = np.array([g.values[m] for g in group], dtype=np.float64)
      row[f"{m}_mean"] = float(xs.mean())
      row[f"{m}_std"] = float(xs.std(ddof=1)) if len(xs) > 1 else 0.0
    rows.append(row)
  best = min(rows, key=lambda r: r["final_val_loss_mean"])
  for row in rows:
    se = math.sqrt(row["final_val_loss_std"] ** 2 / row["n"] + best["final_val_loss_std"] ** 2 / best["n"])
    row["delta_vs_best"] = row["final_val_loss_mean"] - best["final_val_loss_mean"]
    row["beyond_noise"] = row is not best and abs(row["delta_vs_best"]) > 2 * se
  return sorted(rows, key=lambda r: r["final_val_loss_mean"])


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
  keys = list(dict.fromkeys(k for row in rows for k in row))
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)


def markdown_table(rows: list[dict[str, Any]]) -> str:
  head = ("| variant | seeds | final val loss | best val loss | Δ vs best | tokens/s | MFU | wall time (s) | params |\n"
          "|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  for r in rows:
    pm = lambda m, fmt, r=r: f"{r[m + '_mean']:{fmt}} ± {r[m + '_std']:{fmt}}"
    mark = " **(beyond seed noise)**" if r["beyond_noise"] else ""
    lines.append(f"| {r['variant']} | {r['n']} | {pm('final_val_loss', '.4f')} | {pm('best_val_loss', '.4f')} | "
                 f"{r['delta_vs_best']:+.4f}{mark} | {pm('tokens_per_s', ',.0f')} | "
                 f"{100 * r['mfu_mean']:.1f}% ± {100 * r['mfu_std']:.1f} | {pm('wall_time_s', '.0f')} | "
                 f"{r['num_params_mean']:,.0f} |")
  return "\n".join(lines) + "\n"


def plot(results: list[RunResult], rows: list[dict[str, Any]], sweep: sweeps.Sweep, out_dir: str) -> list[str]:
  """Validation curves per variant (mean line, min–max band over seeds) and final loss per swept value."""
  paths = []
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for row in rows:
    curves = [r.val_curve for r in results if r.run.variant == row["variant"]]
    steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves]))
    ys = np.array([[dict(c)[s] for s in steps] for c in curves])
    ax.plot(steps, ys.mean(0), label=f"{row['variant']} (n={len(curves)})")
    ax.fill_between(steps, ys.min(0), ys.max(0), alpha=0.25)
  ax.set(xlabel="step", ylabel="validation loss", title="Validation loss (band: min–max over seeds)")
  ax.legend()
  paths.append(os.path.join(out_dir, "val_loss_curves.png"))
  fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
  plt.close(fig)
  for key in [*sweep.grid, *sweep.zipped]:
    fig, ax = plt.subplots(figsize=(5, 4))
    labels = [str(row[key]) for row in rows]
    ax.errorbar(range(len(rows)), [r["final_val_loss_mean"] for r in rows],
                yerr=[r["final_val_loss_std"] for r in rows], fmt="o", capsize=4)
    ax.set_xticks(range(len(rows)), labels)
    ax.set(xlabel=key, ylabel="final validation loss", title=f"Final validation loss vs {key} (± std)")
    paths.append(os.path.join(out_dir, f"final_loss_vs_{key.replace('.', '_')}.png"))
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
  return paths


def write_report(sweep: sweeps.Sweep, root: str) -> dict[str, Any]:
  """results.csv, runs.csv, results.md and the PNGs under `root`; returns the aggregated rows."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--root={root} does not exist; run the sweep first")
  runs = sweeps.expand(sweep, root)
  results = [r for r in (collect_run(run) for run in runs) if r is not None]
  if not results:
    raise ValueError(f"no run under {root} has validation metrics yet; run the sweep first")
  rows = aggregate(results)
  write_csv(os.path.join(root, "results.csv"), rows)
  write_csv(os.path.join(root, "runs.csv"),
            [{"run": r.run.name, "variant": r.run.variant, "seed": r.run.seed, **r.values} for r in results])
  table = markdown_table(rows)
  with open(os.path.join(root, "results.md"), "w", encoding="utf-8") as f:
    f.write(f"{len(results)} of {len(runs)} runs reported.\n\n{table}")
  return {"rows": rows, "table": table, "plots": plot(results, rows, sweep, root),
          "missing": [r.name for r in runs if r.name not in {x.run.name for x in results}]}
