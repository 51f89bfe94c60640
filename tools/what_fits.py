"""BUILD.md's "what fits where" table: the planner (`llm_jax.planner`) for each shape x TPU slice, compiled on this
machine through libtpu.

Command:  JAX_PLATFORMS=cpu python tools/what_fits.py --out=experiments/results/what_fits.jsonl
          (appends one JSON line per cell, skips cells already there, then prints the Markdown table;
          --cells=llama3_8b:v6e-256 runs only the cells named)
Search:   mesh fsdp (everything over fsdp), remat 'dots' (the accelerator shapes' own; 'full' only where 'dots'
          does not fit at one sequence per chip), micro-batches per chip 1, 2, 4, ... 32: the largest the planner's
          proportional guess finds (it errs small: a larger one may fit).
Shapes:   experiments/bench.py's gpt2_125m, gpt2_350m, llama_1b (context 2048) through `llm_jax.bench.bench_config`,
          and a Llama-3-8B shape (32 layers x 4096, 32 heads sharing 8 KV heads, MLP 14336, vocabulary 128,256,
          untied, RoPE theta 500,000, context 8192) built on llama_1b's settings (bf16, AdamW, attention 'jax').
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from llm_jax import bench
from llm_jax import config as config_lib
from llm_jax import planner

SHAPES = ("llama3_8b", "llama_1b", "gpt2_350m", "gpt2_125m")
SLICES = ("v5e-8", "v5p-8", "v6e-8", "v5p-128")
EXTRA = (("llama3_8b", "v6e-256"),)  # MaxText publishes Llama3.1-8B at context 8192 on v6e-256
# MaxText's published MFU beside the shapes it publishes (quoted in issue 39, from MaxText's README): measured on
# the hardware named, so an achieved figure beside our roofline bound. Its Llama2-70B on 512 v5p chips (65.4%) has no
# row here.
MAXTEXT = {("llama3_8b", "v6e-256"): "45.5% (Llama3.1-8B, context 8192, v6e-256)"}


def shape_config(shape: str):
  """The experiment config of a table row."""
  if shape != "llama3_8b":
    return bench.bench_config(shape)
  c = bench.bench_config("llama_1b")
  c.model.update({"num_layers": 32, "d_model": 4096, "num_heads": 32, "num_kv_heads": 8, "d_ff": 14336,
                  "vocab_size": 128256, "tie_embeddings": False, "rope_theta": 500000.0})
  c.data.seq_len = 8192
  return c


def cell(shape: str, topology: str) -> dict:
  """The planner's best candidate (or its refusal) for one shape on one slice."""
  c = shape_config(shape)
  c.topology, c.plan = topology, True
  run = config_lib.resolve(c)
  start = time.perf_counter()
  log = lambda line: print(line, flush=True)  # noqa: E731
  rows = planner.plan(run, remats=("dots",), meshes=("fsdp",), log=log, cache_dir=planner.CACHE_DIR)
  if not rows[0]["fits"]:
    rows += planner.plan(run, remats=("full",), meshes=("fsdp",), log=log, cache_dir=planner.CACHE_DIR)
    rows.sort(key=lambda r: (not r["fits"], -r.get("tokens_per_s", 0.0)))
  return {"shape": shape, "topology": topology, "best": rows[0], "candidates": len(rows),
          "wall_s": time.perf_counter() - start, "seq_len": c.data.seq_len}


def _why(reason: str) -> str:
  """The refusal's figures and advice, short enough for a table cell."""
  need = re.search(r"\(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)", reason)
  advice = reason.rsplit("; ", 1)[-1]
  return (f"needs {need[1]} of temporaries, {need[2]} available; " if need else "") + advice


def table(results: list[dict]) -> str:
  lines = ["| shape | slice | fits | GiB per chip (peak / HBM) | best mesh, remat, micro-batch per chip | "
           "est. tokens/s | est. MFU | bound | compile wall s | MaxText MFU |", "|---" * 10 + "|"]
  for r in results:
    b = r["best"]
    if b["fits"]:
      mesh = "x".join(f"{k}{v}" for k, v in b["mesh"].items() if v > 1)
      lines.append(f"| {r['shape']} | {r['topology']} | yes | {b['peak_gib']:.1f} / {b['hbm_gib']:.0f} | {mesh}, "
                   f"{b['remat']}, {b['micro_batch_per_chip']} | {b['tokens_per_s']:,.0f} | {100 * b['mfu']:.0f}% | "
                   f"{b['bound']} | {r['wall_s']:.0f} | {MAXTEXT.get((r['shape'], r['topology']), '')} |")
    else:
      lines.append(f"| {r['shape']} | {r['topology']} | no | {_why(b['reason'])} | | | | | {r['wall_s']:.0f} | |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="experiments/results/what_fits.jsonl")
  parser.add_argument("--cells", default="", help="shape:slice,... (default: every shape x slice, then EXTRA)")
  args = parser.parse_args()
  wanted = ([tuple(c.split(":")) for c in args.cells.split(",")] if args.cells else
            [(s, t) for s in SHAPES for t in SLICES] + list(EXTRA))
  done = []
  if os.path.exists(args.out):
    with open(args.out, encoding="utf-8") as f:
      done = [json.loads(line) for line in f if line.strip()]
  for shape, topology in wanted:
    if any(r["shape"] == shape and r["topology"] == topology for r in done):
      continue
    print(f"== {shape} on {topology}", flush=True)
    result = cell(shape, topology)
    done.append(result)
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(json.dumps(result) + "\n")
  order = {(s, t): i for i, (s, t) in enumerate([(s, t) for s in SHAPES for t in SLICES] + list(EXTRA))}
  first = {}
  for r in done:  # two runs may have written the same cell: the first one counts
    first.setdefault((r["shape"], r["topology"]), r)
  print(table(sorted(first.values(), key=lambda r: order.get((r["shape"], r["topology"]), len(order)))))


if __name__ == "__main__":
  sys.exit(main())
