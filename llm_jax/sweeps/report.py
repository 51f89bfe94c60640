"""Sweep reports: per-run numbers, per-variant mean ± std over seeds, the seed-noise test, CSV, Markdown, PNGs.

Per run (finished runs only), from `metrics.jsonl` and `run.json`:
  final_val_loss  the last logged validation loss;   best_val_loss  the lowest one;
  tokens_per_s, mfu  medians over the run's log lines (robust to other jobs sharing the machine;
                     the trainer already keeps compilation out of them);
  wall_time_s     the run card's training wall time (all invocations);   num_params  from the run card;
  zero_shot/<file>/<metric>, harness/<task>/<metric>  the last logged value of each downstream-task metric
                  the runs evaluated during training (eval_zero_shot_files, eval_harness_tasks), when every
                  finished run has it.
Per variant: the mean and the sample standard deviation (ddof=1) over its seeds.

Seed noise. For each validation-loss metric the reference is the variant with the lowest mean, and a
variant's difference to it counts as larger than the seed noise when
    |mean_v - mean_ref| > 2 · sqrt(s_v² / n_v + s_ref² / n_ref)
(twice the standard error of the difference: a two-sided z-test at about 95%; with 2–3 seeds it is
a rough guide, not a significance test). Variants with a single seed are never marked.
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

from llm_jax import errors
from llm_jax import writers  # noqa: E402
from llm_jax.sweeps import plan  # noqa: E402
from llm_jax.sweeps import runcard  # noqa: E402

METRICS = ("final_val_loss", "best_val_loss", "tokens_per_s", "mfu", "wall_time_s", "num_params")
NOISE_METRICS = ("final_val_loss", "best_val_loss")
TASK_PREFIXES = ("zero_shot/", "harness/")  # metric names the training-time task evaluators log


@dataclasses.dataclass
class RunResult:
  run: plan.Run
  values: dict[str, float]
  val_curve: list[tuple[int, float]]


@dataclasses.dataclass
class Report:
  rows: list[dict[str, Any]]  # one per variant, best final validation loss first
  table: str  # Markdown
  files: list[str]  # everything written
  missing: list[str]  # runs of the sweep that have not finished


def collect_run(run: plan.Run) -> RunResult | None:
  """A finished run's numbers; None while it is new, unfinished or has no validation loss."""
  card = runcard.read(run.workdir)
  if card is None or card.get("status") != "finished":
    return None
  records = writers.read_metrics(run.workdir)
  curve = [(int(r["step"]), float(r["val_loss"])) for r in records if "val_loss" in r]
  if not curve:
    return None
  tasks = {k: float(v) for r in records for k, v in r.items() if k.startswith(TASK_PREFIXES)}  # last value wins
  speed = [r for r in records if "tokens_per_s" in r]
  median = lambda key: float(np.median([r[key] for r in speed])) if speed else math.nan
  values = {
      "final_val_loss": curve[-1][1],
      "best_val_loss": min(v for _, v in curve),
      "tokens_per_s": median("tokens_per_s"),
      "mfu": median("mfu"),
      "wall_time_s": float(card.get("wall_time_s", math.nan)),
      "num_params": float(card.get("num_params", math.nan)),
      **tasks,
  }
  return RunResult(run=run, values=values, val_curve=curve)


def _mark_noise(rows: list[dict[str, Any]], metric: str) -> None:
  ref = min(rows, key=lambda r: r[f"{metric}_mean"])
  for row in rows:
    delta = row[f"{metric}_mean"] - ref[f"{metric}_mean"]
    se = math.sqrt(row[f"{metric}_std"] ** 2 / row["n"] + ref[f"{metric}_std"] ** 2 / ref["n"])
    row[f"{metric}_delta"] = delta
    row[f"{metric}_beyond_noise"] = row["n"] > 1 and ref["n"] > 1 and abs(delta) > 2 * se


def task_metrics(results: list[RunResult]) -> list[str]:
  """The downstream-task metrics every run logged, in name order."""
  shared = set.intersection(*[set(r.values) for r in results]) if results else set()
  return sorted(k for k in shared if k.startswith(TASK_PREFIXES))


def aggregate(results: list[RunResult]) -> list[dict[str, Any]]:
  """One row per variant: its swept values, n seeds, mean and sample std of every metric, noise marks."""
  by_variant: dict[str, list[RunResult]] = {}
  for r in results:
    by_variant.setdefault(r.run.variant, []).append(r)
  rows = []
  for variant, group in by_variant.items():
    row: dict[str, Any] = {"variant": variant, **group[0].run.point, "n": len(group),
                           "seeds": " ".join(str(g.run.seed) for g in group)}
    for m in METRICS + tuple(task_metrics(results)):
      xs = np.array([g.values[m] for g in group], dtype=np.float64)
      row[f"{m}_mean"] = float(xs.mean())
      row[f"{m}_std"] = float(xs.std(ddof=1)) if len(xs) > 1 else math.nan
    rows.append(row)
  for metric in NOISE_METRICS:
    _mark_noise(rows, metric)
  return sorted(rows, key=lambda r: r["final_val_loss_mean"])


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
  keys = list(dict.fromkeys(k for row in rows for k in row))
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)


def _pm(row: dict[str, Any], metric: str, fmt: str, scale: float = 1.0) -> str:
  mean, std = scale * row[f"{metric}_mean"], scale * row[f"{metric}_std"]
  return f"{mean:{fmt}}" + ("" if math.isnan(std) else f" ± {std:{fmt}}")


def _delta(row: dict[str, Any], metric: str) -> str:
  return f"{row[f'{metric}_delta']:+.4f}" + (" †" if row[f"{metric}_beyond_noise"] else "")


def markdown_table(rows: list[dict[str, Any]], tasks: tuple[str, ...] = ()) -> str:
  """The per-variant table (mean ± std over seeds, `tasks` metrics last) with the seed-noise footnote."""
  lines = ["| variant | seeds | final val loss | Δ final | best val loss | Δ best | tokens/s | MFU (%) | "
           "wall time (s) | params |" + "".join(f" {t} |" for t in tasks), "|" + "---|" * (10 + len(tasks))]
  for r in rows:
    cells = [r["variant"], str(r["n"]), _pm(r, "final_val_loss", ".4f"), _delta(r, "final_val_loss"),
             _pm(r, "best_val_loss", ".4f"), _delta(r, "best_val_loss"), _pm(r, "tokens_per_s", ",.0f"),
             _pm(r, "mfu", ".1f", 100.0), _pm(r, "wall_time_s", ".0f"), f"{r['num_params_mean']:,.0f}",
             *(_pm(r, t, ".4f") for t in tasks)]
    lines.append("| " + " | ".join(cells) + " |")
  note = ("\nMean ± sample standard deviation over seeds. Δ: difference to the variant with the lowest mean; "
          "† marks a difference larger than the seed noise, |Δ| > 2·sqrt(s²/n + s_ref²/n_ref).\n")
  return "\n".join(lines) + "\n" + note


def plot_curves(results: list[RunResult], rows: list[dict[str, Any]], path: str) -> None:
  """Validation loss against step: the mean over seeds per variant, the seeds' min–max as a band."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for row in rows:
    curves = [dict(r.val_curve) for r in results if r.run.variant == row["variant"]]
    steps = sorted(set.intersection(*[set(c) for c in curves]))
    ys = np.array([[c[s] for s in steps] for c in curves])
    ax.plot(steps, ys.mean(0), marker=".", label=f"{row['variant']} (n={len(curves)})")
    ax.fill_between(steps, ys.min(0), ys.max(0), alpha=0.25)
  ax.set(xlabel="step", ylabel="validation loss", title="Validation loss (line: mean, band: min–max over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: names can be long
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def _numeric(values: list[Any]) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_against(rows: list[dict[str, Any]], finals: dict[str, list[float]], keys: list[str],
                 group_keys: list[str], path: str, metric: str = "final_val_loss") -> None:
  """`metric` (final validation loss by default) against the values of `keys` (zipped keys move together):
  mean ± std and every seed's value (`finals`, by variant), one series per combination of the other swept
  `group_keys`."""
  label = lambda row: ", ".join(str(row[k]) for k in keys)
  xs = list(dict.fromkeys(label(r) for r in rows))
  numeric = len(keys) == 1 and _numeric([r[keys[0]] for r in rows])
  position = lambda row: row[keys[0]] if numeric else xs.index(label(row))
  fig, ax = plt.subplots(figsize=(6, 4))
  series: dict[str, list[dict[str, Any]]] = {}
  for row in rows:
    series.setdefault(", ".join(f"{k}={row[k]}" for k in group_keys), []).append(row)
  for name, members in series.items():
    members = sorted(members, key=position)
    x = [position(r) for r in members]
    yerr = [0.0 if math.isnan(r[f"{metric}_std"]) else r[f"{metric}_std"] for r in members]
    line = ax.errorbar(x, [r[f"{metric}_mean"] for r in members], yerr=yerr, fmt="o-" if numeric else "o",
                       capsize=4, label=name or "mean ± std")
    for row in members:
      seeds = finals[row["variant"]]
      offset = 0 if numeric else 0.08
      ax.scatter([position(row) + offset] * len(seeds), seeds, marker="x", s=25, color=line[0].get_color(), alpha=0.7)
  if numeric:
    positive = [v for v in (r[keys[0]] for r in rows) if v > 0]
    if len(positive) == len(rows) and max(positive) >= 10 * min(positive):
      ax.set_xscale("log")
  else:
    ax.set_xticks(range(len(xs)), xs)
    ax.set_xlim(-0.5, len(xs) - 0.5)
  name = "final validation loss" if metric == "final_val_loss" else metric
  ax.set(xlabel=", ".join(keys), ylabel=name, title=f"{name} (dot: mean ± std over seeds; ×: each seed)")
  ax.grid(alpha=0.3)
  if group_keys:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def _plots(results: list[RunResult], rows: list[dict[str, Any]], sweep: plan.Sweep, out_dir: str) -> list[str]:
  """The curves and one plot per swept key (per group of zipped keys), variants in the sweep's order."""
  order = list(dict.fromkeys(r.run.variant for r in results))
  rows = sorted(rows, key=lambda row: order.index(row["variant"]))
  paths = [os.path.join(out_dir, "val_loss_curves.png")]
  plot_curves(results, rows, paths[0])
  axes = [[k] for k in sweep.grid] + ([list(sweep.zipped)] if sweep.zipped else [])
  for metric in ["final_val_loss", *task_metrics(results)]:
    finals = {v: [r.values[metric] for r in results if r.run.variant == v] for v in order}
    for keys in axes:
      others = [k for k in sweep.grid if k not in keys] + ([] if keys == list(sweep.zipped) else list(sweep.zipped))
      stem = f"{metric}_vs_{'+'.join(keys)}".replace(".", "_").replace("/", "_")
      paths.append(os.path.join(out_dir, f"{stem}.png"))
      plot_against(rows, finals, keys, others, paths[-1], metric)
  return paths


def write_report(sweep: plan.Sweep, root: str) -> Report:
  """results.csv (per variant), runs.csv (per run), results.md and the PNGs, all under `root`."""
  if not os.path.isdir(root):
    raise errors.MissingFileError(f"--root={root} does not exist; pass the --root the sweep ran in")
  runs = plan.expand(sweep, root)
  results = [r for r in (collect_run(run) for run in runs) if r is not None]
  if not results:
    raise errors.RunError(f"no run under {root} has finished with a validation loss yet; run the sweep first")
  rows = aggregate(results)
  files = [os.path.join(root, name) for name in ("results.csv", "runs.csv", "results.md")]
  write_csv(files[0], rows)
  write_csv(files[1], [{"run": r.run.name, "variant": r.run.variant, "seed": r.run.seed, **r.values}
                       for r in results])
  table = markdown_table(rows, tuple(task_metrics(results)))
  missing = [run.name for run in runs if run.name not in {r.run.name for r in results}]
  with open(files[2], "w", encoding="utf-8") as f:
    f.write(f"Sweep `{sweep.path}` (base `{sweep.base}`): {len(results)} of {len(runs)} runs finished"
            + (f"; not yet: {', '.join(missing)}" if missing else "") + ".\n\n" + table)
  return Report(rows=rows, table=table, files=files + _plots(results, rows, sweep, root), missing=missing)
