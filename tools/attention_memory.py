"""What splash attention saves in TPU memory, measured by compiling the train step for a TPU slice on this machine.

For each depth, context and attention (XLA's einsum attention against splash), the llama_1b bench shape's train
step (bf16, remat 'dots', AdamW as the bench shape sets it, one micro-batch, fsdp over every chip) is compiled through
libtpu for `--topology` (default v5e:2x4, 8 chips) and `memory_analysis()` is read: the peak per chip is
arguments + outputs - donated (aliased) bytes + temporaries. The largest global batch that fits (a multiple of the
chip count, so every chip holds whole rows) is predicted from two compiles and checked by a third against
`--hbm_gib` (v5e: 16 GiB per chip); see `largest_batch`.

Command (about 30-60 minutes on 2 busy cores; needs libtpu, `pip install -r requirements-test.txt`):
  JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 \\
    python tools/attention_memory.py --out_json=/tmp/attention_memory.json
Results: BENCHMARKS.md ("Flash attention on TPU: compiled memory").
"""

from __future__ import annotations

import json
import re
import time
from typing import Any
from typing import Callable
from typing import Sequence

import jax
from absl import app
from absl import flags
from jax.experimental import topologies

from llm_jax import bench
from llm_jax import config as config_lib
from llm_jax import optim
from llm_jax import sharding
from llm_jax import steps as steps_lib

_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x4", "TPU slice to compile for (jax.experimental.topologies).")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 16.0, "Memory per chip the batch must fit in (v5e: 16 GiB).")
_SHAPE = flags.DEFINE_string("shape", "llama_1b", "Bench shape (llm_jax.bench.bench_config) whose widths are used.")
_LAYERS = flags.DEFINE_list("layers", ["16", "4"], "Depths to measure (16: llama_1b itself).")
_CONTEXTS = flags.DEFINE_list("contexts", ["2048", "8192"], "Sequence lengths.")
_IMPLS = flags.DEFINE_list("impls", ["einsum", "splash"], "model.attention_impl values to compare.")
_MAX_ROWS = flags.DEFINE_integer("max_rows_per_chip", 64, "Upper end of the batch search, in rows per chip.")
_JSON = flags.DEFINE_string("out_json", "", "Write the table here as JSON too.")

GIB = 1024**3


def peak_bytes(spec: str, layers: int, context: int, impl: str, batch: int, devices: Sequence[Any]) -> int:
  """Per-chip peak of the compiled train step (arguments + outputs - aliased + temporaries); when the compiler
  refuses the step for running out of HBM, the temporaries it said it needed."""
  c = bench.bench_config(spec)
  c.model.update({"num_layers": layers, "attention_impl": impl, "max_len": context})
  c.data.seq_len = context
  run = config_lib.check(c)
  cfg = run.model
  mesh = sharding.make_mesh((1, len(devices), 1), devices)
  tx, schedule = optim.make_optimizer(run.optim, c.num_train_steps)
  with jax.set_mesh(mesh):
    fns = steps_lib.build_steps(cfg, tx, schedule, mesh, seed=0, seq_len=context, accum=1)
    try:
      memory = fns.lower_train(batch, context).compile().memory_analysis()
    except jax.errors.JaxRuntimeError as e:  # libtpu refuses temporaries beyond the chip's HBM: that is no fit
      needed = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
      if "RESOURCE_EXHAUSTED" not in str(e) or needed is None:
        raise
      return int(float(needed.group(1)) * GIB)  # a lower bound on the peak, above any HBM it was refused for
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes)


def largest_batch(measure: Callable[[int], float], chips: int, limit: float,
                  max_rows: int) -> tuple[int, dict[int, float]]:
  """The largest multiple of `chips` rows whose measured peak fits `limit` bytes (0 if one row per chip does not),
  and every peak measured, by global batch.

  A compile costs minutes here, so instead of bisecting: the peak is measured at one and two rows per chip, the
  straight line through them (activations grow linearly in the batch) predicts the largest fit, and that batch is
  compiled to check; while the check fails, one row per chip less is tried.
  """
  peaks: dict[int, float] = {}

  def peak(rows: int) -> float:
    if rows * chips not in peaks:
      peaks[rows * chips] = measure(rows * chips)
    return peaks[rows * chips]

  if peak(1) > limit:
    return 0, peaks
  per_row = peak(2) - peak(1)
  rows = max_rows if per_row <= 0 else min(max_rows, max(1, 1 + int((limit - peak(1)) // per_row)))
  while rows > 1 and peak(rows) > limit:
    rows -= 1
  return rows * chips, peaks


def main(argv: Sequence[str]) -> None:
  del argv
  devices = topologies.get_topology_desc(topology_name=_TOPOLOGY.value, platform="tpu").devices
  rows = []
  for layers in map(int, _LAYERS.value):
    for context in map(int, _CONTEXTS.value):
      for impl in _IMPLS.value:
        start = time.perf_counter()
        measure = lambda b, layers=layers, context=context, impl=impl: peak_bytes(  # noqa: E731
            _SHAPE.value, layers, context, impl, b, devices)
        batch, peaks = largest_batch(measure, len(devices), _HBM_GIB.value * GIB, _MAX_ROWS.value)
        row = {"layers": layers, "context": context, "impl": impl, "largest_batch": batch,
               "peak_gib_at_chip_count": peaks[len(devices)] / GIB,
               "peak_gib_at_largest": peaks[batch] / GIB if batch else None,
               "peaks_gib": {b: p / GIB for b, p in sorted(peaks.items())}, "seconds": time.perf_counter() - start}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if _JSON.value:  # after every row: a long run that is stopped keeps what it measured
          with open(_JSON.value, "w", encoding="utf-8") as f:
            json.dump({"topology": _TOPOLOGY.value, "hbm_gib": _HBM_GIB.value, "shape": _SHAPE.value, "rows": rows},
                      f, indent=2)
  print(f"\n{_SHAPE.value} widths on {_TOPOLOGY.value} ({len(devices)} x {devices[0].device_kind}), "
        f"{_HBM_GIB.value:g} GiB per chip")
  print(f"{'layers':>6} {'context':>7} {'attention':>9} {'peak GiB/chip at batch ' + str(len(devices)):>26} "
        f"{'largest batch':>13} {'its peak GiB':>12}")
  for r in rows:
    at_largest = f"{r['peak_gib_at_largest']:.2f}" if r["largest_batch"] else "-"
    print(f"{r['layers']:>6} {r['context']:>7} {r['impl']:>9} {r['peak_gib_at_chip_count']:>26.2f} "
          f"{r['largest_batch']:>13} {at_largest:>12}")


if __name__ == "__main__":
  app.run(main)
