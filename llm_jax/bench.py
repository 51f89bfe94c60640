"""`python -m llm_jax.bench`: step time, tokens/s, MFU, compile time, memory and decode speed, as medians.

MFU is achieved model FLOP/s over a peak: on CPU the float32 matmul rate measured in this process just
before each config; on GPU/TPU the bf16 datasheet peak of the device kind (`llm_jax.metrics`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from typing import Any
from typing import Sequence

import flax.linen as nn
import jax
import ml_collections
from absl import app
from absl import flags

from llm_jax import batch as batch_lib
from llm_jax import config as config_lib
from llm_jax import launch
from llm_jax import metrics as metrics_lib
from llm_jax import sampling
from llm_jax import sharding
from llm_jax import trainer
from llm_jax.data import pipeline
from llm_jax.model import Transformer

_CONFIGS = flags.DEFINE_list("configs", ["tiny", "10m"], "Variants of experiments/bench.py, or config files "
                             "(path.py[:variant]), to measure.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Repeats; medians are reported.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_REAL_DATA = flags.DEFINE_bool("real_data", True, "Also time the step fed by the real grain pipeline.")
_DECODE = flags.DEFINE_bool("decode", True, "Also time KV-cached generation at batch 1 and 8.")
_COMPILE_DEPTH = flags.DEFINE_bool("compile_depth", False, "Compare compile time of 4 and 32 layers.")
_JSON = flags.DEFINE_string("json", None, "Write all results to this JSON file.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/llm_jax_bench", "Cache for the tokenizer and packed data.")

# Bare names in --configs are variants of this experiment file (relative to the repository).
BENCH_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "bench.py")


def bench_config(spec: str) -> ml_collections.ConfigDict:
  """The experiment config `spec` names: 'tiny' (a variant of experiments/bench.py) or 'path.py[:variant]'."""
  return config_lib.from_file(spec if ".py" in spec else f"{BENCH_FILE}:{spec}")


def _median_step_time(train, state, batches, steps: int, repeats: int, warmup: int):
  """Median seconds per step: each repeat dispatches `steps` steps and waits once at the end."""
  for i in range(warmup):
    state, m = train(state, batches(i))
  jax.block_until_ready(m)
  times = []
  for r in range(repeats):
    start = time.perf_counter()
    for i in range(steps):
      state, m = train(state, batches(r * steps + i))
    jax.block_until_ready(m)
    times.append((time.perf_counter() - start) / steps)
  return statistics.median(times), state


def bench_train(name: str, steps: int, repeats: int, warmup: int, real_data: bool, workdir: str) -> dict:
  """Compile time, memory, and median step time with synthetic (and optionally real) batches."""

  c = bench_config(name)
  peak, peak_source = metrics_lib.peak_flops_total()
  mesh = sharding.make_mesh((-1, 1, 1))
  b, l = c.global_batch_size, c.data.seq_len
  with jax.set_mesh(mesh):
    cfg, fns = trainer.make_steps(c, mesh, c.model.vocab_size)
    start = time.perf_counter()
    compiled = fns.lower_train(b, l).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    on_device = trainer.to_global(batch_lib.synthetic(b, l, cfg.vocab_size), fns.batch_sharding)
    state = fns.init()
    step_s, state = _median_step_time(compiled, state, lambda i: on_device, steps, repeats, warmup)
    result = {"config": name, "model": dataclasses.asdict(cfg), "global_batch_size": b, "compile_s": compile_s,
              "step_time_s": step_s}
    if real_data:
      data = pipeline.prepare_data(config_lib.data_config(c), config_lib.tokenizer_config(c),
                                   tokenizer_dir=os.path.join(workdir, name, "tokenizer"))
      it = pipeline.make_train_iterator(data, global_batch_size=b, seed=0, process_index=0, process_count=1)
      real_s, state = _median_step_time(compiled, state, lambda i: trainer.to_global(next(it), fns.batch_sharding),
                                        steps, repeats, warmup)
      result["step_time_real_data_s"] = real_s
      result["real_over_synthetic"] = real_s / step_s
  flops = metrics_lib.flops_per_token(cfg, l)
  tokens_per_s = b * l / step_s
  result.update({
      "tokens_per_s": tokens_per_s,
      "flops_per_token_standard": flops["standard"], "flops_per_token_causal": flops["causal"],
      "non_embedding_params": flops["non_embedding_params"],
      "achieved_flops_per_s": tokens_per_s * flops["causal"],
      "peak_flops_per_s": peak, "peak_source": peak_source,
      "mfu": tokens_per_s * flops["causal"] / peak,
      "mfu_standard_formula": tokens_per_s * flops["standard"] / peak,
      "peak_device_memory_bytes": (getattr(memory, "temp_size_in_bytes", 0)
                                   + getattr(memory, "argument_size_in_bytes", 0)),
      "host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
  })
  return result


def bench_compile_depth(name: str) -> dict:
  """Compile time of the train step at 4 and 32 layers (scan keeps it nearly flat)."""

  out = {}
  jax.config.update("jax_enable_compilation_cache", False)
  for layers in (4, 32):
    c = bench_config(name)
    c.model.num_layers = layers
    mesh = sharding.make_mesh((-1, 1, 1))
    with jax.set_mesh(mesh):
      _, fns = trainer.make_steps(c, mesh, c.model.vocab_size)
      start = time.perf_counter()
      fns.lower_train(c.global_batch_size, c.data.seq_len).compile()
      out[f"compile_s_{layers}_layers"] = time.perf_counter() - start
  out["compile_ratio_32_over_4"] = out["compile_s_32_layers"] / out["compile_s_4_layers"]
  return out


def bench_decode(name: str, repeats: int) -> dict:
  """Decode tokens/s at batch 1 and 8, and per-token time at growing lengths (KV cache keeps it flat)."""
  c = bench_config(name)
  c.model.max_len = max(c.data.seq_len, 512)  # room to show per-token time against length
  cfg = config_lib.model_config(c, c.model.vocab_size)
  params = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), jax.numpy.zeros((1, 8), "int32"))["params"])
  params = jax.device_put(params, jax.devices()[0])
  out: dict[str, Any] = {}
  lengths = [n for n in (64, 128, 256, 512) if n <= cfg.max_len]
  for batch in (1, 8):
    per_token = {}
    for length in lengths:
      times = []
      for r in range(repeats + 1):
        start = time.perf_counter()
        sampling.generate(params, cfg, [2, 5, 7, 9], max_length=length, num_return_sequences=batch,
                          temperature=1.0, top_k=0, top_p=1.0, seed=r, eos_id=None)
        times.append(time.perf_counter() - start)
      per_token[length] = statistics.median(times[1:]) / (length - 4)  # first call compiles
    out[f"decode_tokens_per_s_batch{batch}"] = batch / per_token[lengths[-1]]
    out[f"decode_s_per_token_batch{batch}_by_length"] = per_token
    # What one token costs without a cache: a full forward over the whole prefix.
    out[f"no_cache_s_per_token_batch{batch}_by_length"] = {
        length: _median_forward_s(params, cfg, batch, length, repeats) for length in lengths}
  return out


def _median_forward_s(params: Any, cfg: Any, batch: int, length: int, repeats: int) -> float:
  forward = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[0])
  return metrics_lib.median_seconds(forward, params, jax.numpy.zeros((batch, length), "int32"), repeats=repeats)


def run(configs: Sequence[str], steps: int, repeats: int, warmup: int, real_data: bool, decode: bool,
        compile_depth: bool, workdir: str) -> list[dict]:
  results = []
  for name in configs:
    r = bench_train(name, steps, repeats, warmup, real_data, workdir)
    if decode:
      r.update(bench_decode(name, max(repeats // 2, 1)))
    if compile_depth:
      r.update(bench_compile_depth(name))
    print(format_result(r), flush=True)
    results.append(r)
  return results


def format_result(r: dict) -> str:
  lines = [f"[{r['config']}] {r['device_count']} x {r['device_kind']}: step {1000 * r['step_time_s']:.1f} ms, "
           f"{r['tokens_per_s']:,.0f} tok/s, {r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s achieved, "
           f"MFU {100 * r['mfu']:.1f}% (6N+12LTD formula: {100 * r['mfu_standard_formula']:.1f}%) of "
           f"{r['peak_flops_per_s'] / 1e9:.0f} GFLOP/s ({r['peak_source']}); compile {r['compile_s']:.1f} s"]
  if "real_over_synthetic" in r:
    lines.append(f"  real data step {1000 * r['step_time_real_data_s']:.1f} ms = "
                 f"{r['real_over_synthetic']:.3f}x synthetic")
  for batch in (1, 8):
    key = f"decode_tokens_per_s_batch{batch}"
    if key in r:
      by_length = r[f"decode_s_per_token_batch{batch}_by_length"]
      per = ", ".join(f"L={k}: {1000 * v:.2f} ms" for k, v in by_length.items())
      lines.append(f"  decode batch {batch}: {r[key]:,.0f} tok/s; per token {per}")
      no_cache = r[f"no_cache_s_per_token_batch{batch}_by_length"]
      lines.append("    without a cache (full forward per token): " +
                   ", ".join(f"L={k}: {1000 * v:.2f} ms" for k, v in no_cache.items()))
  if "compile_ratio_32_over_4" in r:
    lines.append(f"  compile 4 layers {r['compile_s_4_layers']:.1f} s, 32 layers {r['compile_s_32_layers']:.1f} s "
                 f"(ratio {r['compile_ratio_32_over_4']:.2f})")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

  def body() -> None:
    if not _CONFIGS.value:
      raise ValueError("--configs is empty; name at least one, e.g. --configs=tiny")
    for name in _CONFIGS.value:
      bench_config(name)  # unknown names and files fail before any compile
    results = run(_CONFIGS.value, _STEPS.value, _REPEATS.value, _WARMUP.value, _REAL_DATA.value, _DECODE.value,
                  _COMPILE_DEPTH.value, _WORKDIR.value)
    if _JSON.value:
      with open(_JSON.value, "w", encoding="utf-8") as f:
        json.dump({"argv": sys.argv, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}, f,
                  indent=2, default=str)

  launch.run_main("llm_jax.bench", body)


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
