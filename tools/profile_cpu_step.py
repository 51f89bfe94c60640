"""Where a CPU train step spends its time: forward vs backward, remat policies, and layout copies in the HLO.

Command:  python tools/profile_cpu_step.py --preset=tiny [--trace_dir=/tmp/trace]
          python tools/profile_cpu_step.py --preset=10m --policies=dots --trace_dir=/tmp/trace --timed_calls=2
Hardware: 2-core x86-64 CPU, float32, one device.
Result:   see BENCHMARKS.md ("What limits the CPU figures"), measured 2026-11-28.

It times the jitted forward and forward+backward of a bench shape (a variant of `llm_jax/bench_shapes.py`) with
each remat policy, and inspects the optimized HLO of the gradient: how many `copy` and `transpose`
instructions XLA:CPU emits and how many bytes they write per step, the layout changes that make the
backward pass cost several times the forward. `--trace_dir` also writes a `jax.profiler` trace of a
few gradient steps (of the first of --policies) for TensorBoard's profile plugin or Perfetto, lists the busiest
XLA ops, and tabulates every dot of the program with its shape and achieved GFLOP/s (time from the trace, FLOPs
from the optimized HLO's shapes): how far each of the step's matmuls runs from the machine's peak.
"""

import collections
import dataclasses
import glob
import gzip
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from llm_jax import batch as batch_lib
from llm_jax import bench
from llm_jax import config as config_lib
from llm_jax import metrics
from llm_jax import steps as steps_lib
from llm_jax.model_config import ModelConfig

_PRESET = flags.DEFINE_string("preset", "tiny", "Variant of llm_jax/bench_shapes.py to profile, or a config file "
                              "such as experiments/sotu_small.py:adamw.")
_TIMES = flags.DEFINE_integer("timed_calls", 5, "Timed calls per measurement (medians reported).")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Write a jax.profiler trace of the gradient here.")
_POLICIES = flags.DEFINE_list("policies", ["none", "dots", "full"], "Remat policies to time; the first is traced.")

_SHAPE = re.compile(r"= (f32|s32|pred|u32)\[([0-9,]*)\]")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "pred": 1}


def layout_copies(hlo_text: str) -> dict[str, float]:
  """Copy/transpose instructions that write memory (outside fused computations) and their bytes."""
  counts = {"copy": 0, "transpose": 0}
  megabytes = {"copy": 0.0, "transpose": 0.0}
  in_fusion = False
  for line in hlo_text.splitlines():
    if line.endswith("{") and "->" in line:  # a computation header
      in_fusion = "fused" in line.split("(")[0] or "fusion" in line.split("(")[0]
      continue
    if in_fusion:
      continue
    for op in counts:
      if re.search(rf"\b{op}\(", line) and "=" in line:
        counts[op] += 1
        m = _SHAPE.search(line)
        if m:
          dims = [int(d) for d in m.group(2).split(",") if d]
          megabytes[op] += float(np.prod(dims or [1])) * _BYTES[m.group(1)] / 1e6
  return {"copies": counts["copy"], "copy_MB": megabytes["copy"], "transposes": counts["transpose"],
          "transpose_MB": megabytes["transpose"]}


def op_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
  """Total milliseconds and number of executions per XLA op name in the newest trace (runtime and Python spans
  left out). An op that runs asynchronously (XLA:CPU's plain dots, on Eigen's threads) records only its launch and
  a separate 'end: <op>' event; its time is from each launch to the matching end, which may overlap other ops."""
  path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")))[-1]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  spans: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
  for e in events:
    name = e.get("name", "")
    if e.get("ph") == "X" and not name.startswith("$") and "Executor" not in name and "Pjit" not in name \
        and "ThreadPool" not in name:
      spans[name].append((e["ts"], e["ts"] + e.get("dur", 0)))
  totals: collections.Counter = collections.Counter()
  calls: collections.Counter = collections.Counter()
  for name, starts in spans.items():
    if name.startswith("end: "):
      continue
    ends = sorted(end for _, end in spans.get("end: " + name, []))
    starts = sorted(starts)
    if len(ends) == len(starts):
      totals[name] = sum(end - start for (start, _), end in zip(starts, ends)) / 1000
    else:
      totals[name] = sum(end - start for start, end in starts) / 1000
    calls[name] = len(starts)
  return totals, calls


_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([0-9,]*)\]")
_DOT = re.compile(r"%[\w.\-]+ = \w+\[([0-9,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\).*?lhs_contracting_dims=\{([0-9,]*)\}"
                  r".*?op_name=\"([^\"]*)\"")


def dot_table(hlo_text: str, totals: collections.Counter, calls: collections.Counter,
              steps: int) -> list[dict[str, object]]:
  """Every dot of the optimized HLO that the trace timed, whether inside a library fusion or an instruction of its
  own: milliseconds and calls per step, output shape, contraction size and GFLOP/s, slowest first."""
  shapes: dict[str, list[int]] = {}
  bodies: dict[str, list[str]] = {}
  body = None
  for line in hlo_text.splitlines():
    if line.endswith("{") and "->" in line:
      body = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else None
      if body:
        bodies[body] = []
      continue
    if body is not None:
      bodies[body].append(line)
    m = _INSTR.match(line)
    if m:
      shapes[m.group(1)] = [int(d) for d in m.group(2).split(",") if d]
  rows = []
  for line in hlo_text.splitlines():
    # A dot runs inside a library fusion (YNNPACK, the default) or as an instruction of its own (with that off).
    m = re.search(r"%([\w.\-]+) = .* fusion\(.*calls=%([\w.\-]+)", line) or _INSTR.match(line)
    if not m or m.group(1) not in totals:
      continue
    inner = bodies.get(m.group(2), []) if "fusion(" in line else [line]
    d = next(filter(None, map(_DOT.search, inner)), None)
    if d:
      out = [int(x) for x in d.group(1).split(",") if x]
      lhs = shapes.get(d.group(2), [])
      k = int(np.prod([lhs[int(i)] for i in d.group(3).split(",")])) if lhs else 0
      ms, n = totals[m.group(1)] / steps, calls[m.group(1)] / steps
      gflop = 2 * float(np.prod(out)) * k * n / 1e9
      rows.append({"op": m.group(1), "ms_per_step": ms, "calls_per_step": n, "out": out, "k": k,
                   "gflop_per_s": gflop / ms * 1e3 if ms else 0.0, "source": "/".join(d.group(4).split("/")[-2:])})
  return sorted(rows, key=lambda r: -r["ms_per_step"])


def main(argv):
  del argv
  c = bench.bench_config(_PRESET.value)
  base = dataclasses.replace(config_lib.check(c).model, remat_policy="none")
  b, l = c.global_batch_size, c.data.seq_len
  batch = jax.tree.map(jnp.asarray, batch_lib.synthetic(b, l, base.vocab_size))
  print(f"preset {_PRESET.value}: batch {b} x {l} tokens, {base.num_layers} layers, width {base.d_model}")
  for i, policy in enumerate(_POLICIES.value):
    profile_policy(base, policy, batch, trace=bool(_TRACE_DIR.value) and i == 0)


def profile_policy(base: ModelConfig, policy: str, batch: dict[str, jax.Array], trace: bool) -> None:
  """Times the forward and gradient under remat `policy`, counts the HLO's layout copies and, with `trace`, traces
  the gradient into --trace_dir and prints its busiest ops and its dots."""
  cfg = dataclasses.replace(base, remat_policy=policy)
  model = steps_lib.Transformer(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["inputs"][:1])["params"])
  loss = lambda p, bt, model=model: steps_lib._forward_loss(p, model, bt, None)[0]  # pylint: disable=protected-access
  forward, grad = jax.jit(loss), jax.jit(jax.grad(loss))
  fwd_ms = 1000 * metrics.median_seconds(forward, params, batch, repeats=_TIMES.value)
  grad_ms = 1000 * metrics.median_seconds(grad, params, batch, repeats=_TIMES.value)
  hlo_text = grad.lower(params, batch).compile().as_text()
  stats = layout_copies(hlo_text)
  print(f"remat={policy:<5s} forward {fwd_ms:8.1f} ms | forward+backward {grad_ms:8.1f} ms "
        f"({grad_ms / fwd_ms:.1f}x forward) | HLO: {stats['copies']} copies writing "
        f"{stats['copy_MB']:.1f} MB, {stats['transposes']} transposes writing {stats['transpose_MB']:.1f} MB")
  if trace:
    steps = 3
    with jax.profiler.trace(_TRACE_DIR.value):
      for _ in range(steps):
        jax.block_until_ready(grad(params, batch))
    totals, calls = op_times(_TRACE_DIR.value)
    print(f"  jax.profiler trace written to {_TRACE_DIR.value}; busiest ops, ms per step:")
    for name, ms in totals.most_common(12):
      print(f"    {ms / steps:8.1f} ms  {name}")
    rows = dot_table(hlo_text, totals, calls, steps)
    print(f"  the dots: {sum(r['ms_per_step'] for r in rows):.1f} ms per step in all")
    for r in rows:
      print(f"    {r['ms_per_step']:8.1f} ms  {r['calls_per_step']:g} x out {r['out']} k={r['k']:<6d} "
            f"{r['gflop_per_s']:6.1f} GFLOP/s  {r['source']}")


if __name__ == "__main__":
  app.run(main)
