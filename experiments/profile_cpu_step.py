"""Where a CPU train step spends its time: forward vs backward, remat policies, and layout copies in the HLO.

Command:  python experiments/profile_cpu_step.py --preset=tiny [--trace_dir=/tmp/trace]
Hardware: 2-core x86-64 CPU, float32, one device.
Result:   see BENCHMARKS.md ("What limits the CPU figures"), measured 2026-11-28.

It times the jitted forward and forward+backward of a bench shape (a variant of `experiments/bench.py`) with
each remat policy, and inspects the optimized HLO of the gradient: how many `copy` and `transpose`
instructions XLA:CPU emits and how many bytes they write per step, the layout changes that make the
backward pass cost several times the forward. `--trace_dir` also writes a `jax.profiler` trace of a
few gradient steps for TensorBoard's profile plugin or Perfetto.
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
from llm_jax import config as config_lib
from llm_jax import metrics
from llm_jax import steps as steps_lib

_PRESET = flags.DEFINE_string("preset", "tiny", "Variant of experiments/bench.py to profile.")
_BENCH_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
_TIMES = flags.DEFINE_integer("timed_calls", 5, "Timed calls per measurement (medians reported).")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Write a jax.profiler trace of the gradient here.")

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


def top_ops(trace_dir: str, top: int = 12) -> list[tuple[str, float]]:
  """Total milliseconds per XLA op name in the newest trace (runtime and Python spans left out)."""
  path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")))[-1]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  totals: collections.Counter = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") == "X" and not name.startswith("$") and "Executor" not in name and "Pjit" not in name \
        and "ThreadPool" not in name:
      totals[name] += e.get("dur", 0) / 1000
  return totals.most_common(top)


def main(argv):
  del argv
  c = config_lib.from_file(f"{_BENCH_FILE}:{_PRESET.value}")
  base = dataclasses.replace(config_lib.model_config(c, c.model.vocab_size), remat_policy="none")
  b, l = c.global_batch_size, c.data.seq_len
  batch = jax.tree.map(jnp.asarray, batch_lib.synthetic(b, l, base.vocab_size))
  print(f"preset {_PRESET.value}: batch {b} x {l} tokens, {base.num_layers} layers, width {base.d_model}")
  for policy in ("none", "dots", "full"):
    cfg = dataclasses.replace(base, remat_policy=policy)
    model = steps_lib.Transformer(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["inputs"][:1])["params"])
    loss = lambda p, bt, model=model: steps_lib._forward_loss(p, model, bt, None)[0]  # pylint: disable=protected-access
    forward, grad = jax.jit(loss), jax.jit(jax.grad(loss))
    fwd_ms = 1000 * metrics.median_seconds(forward, params, batch, repeats=_TIMES.value)
    grad_ms = 1000 * metrics.median_seconds(grad, params, batch, repeats=_TIMES.value)
    stats = layout_copies(grad.lower(params, batch).compile().as_text())
    print(f"remat={policy:<5s} forward {fwd_ms:8.1f} ms | forward+backward {grad_ms:8.1f} ms "
          f"({grad_ms / fwd_ms:.1f}x forward) | HLO: {stats['copies']} copies writing "
          f"{stats['copy_MB']:.1f} MB, {stats['transposes']} transposes writing {stats['transpose_MB']:.1f} MB")
    if _TRACE_DIR.value and policy == "none":
      with jax.profiler.trace(_TRACE_DIR.value):
        for _ in range(3):
          jax.block_until_ready(grad(params, batch))
      print(f"  jax.profiler trace written to {_TRACE_DIR.value}; busiest ops over 3 steps:")
      for name, ms in top_ops(_TRACE_DIR.value):
        print(f"    {ms:8.1f} ms  {name}")


if __name__ == "__main__":
  app.run(main)
