"""`python -m llm_jax.bench`: step time, tokens/s, MFU, compile time, memory and decode speed, as medians.

MFU is achieved model FLOP/s over a peak: on CPU the best XLA or numpy float32 matmul rate measured once in
this process (its spread is printed and saved); on GPU/TPU the bf16 datasheet peak of the device kind
(`llm_jax.metrics`).
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
from llm_jax import bench_shapes
from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import launch
from llm_jax import metrics as metrics_lib
from llm_jax import paths
from llm_jax import sampling
from llm_jax import sharding
from llm_jax import steps as steps_lib
from llm_jax.data import pipeline
from llm_jax.model import Transformer
from llm_jax.run_config import RunConfig

_CONFIGS = flags.DEFINE_list("configs", ["tiny", "10m"], "Shapes of llm_jax/bench_shapes.py, or config files "
                             "(path.py[:variant]), to measure.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Repeats; medians are reported.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_REAL_DATA = flags.DEFINE_bool("real_data", True, "Also time the step fed by the real grain pipeline.")
_DECODE = flags.DEFINE_bool("decode", True, "Also time KV-cached generation at batch 1 and 8.")
# Generated lengths (prompt included) decode is timed at by default: per-token time against length shows the cache.
DECODE_LENGTHS = (64, 128, 256, 512)
_DECODE_LENGTHS = flags.DEFINE_list("decode_lengths", [str(n) for n in DECODE_LENGTHS], "Generated lengths (prompt "
                                    "included) at which --decode times a token; tokens/s is read at the longest.")
_COMPILE_DEPTH = flags.DEFINE_bool("compile_depth", False, "Compare compile time of 4 and 32 layers.")
_JSON = flags.DEFINE_string("json", None, "Write all results to this JSON file.")
_FIT_BATCH = flags.DEFINE_bool("fit_batch", False, "Rescale each config's batch to fill about 85% of device memory, "
                                "from the memory analysis of its step compiled at the config's batch (a dry run); "
                                "halved again if the step still runs out of memory. No-op where devices report "
                                "no memory limit (CPU).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/llm_jax_bench", "Cache for the tokenizer and packed data.")

def bench_config(spec: str) -> ml_collections.ConfigDict:
  """The experiment config `spec` names: 'tiny' (a shape of llm_jax/bench_shapes.py) or 'path.py[:variant]'."""
  c = config_lib.from_file(spec) if ".py" in spec else bench_shapes.get_config(spec)
  # A config that sizes the vocabulary from its tokenizer (model.vocab_size=0, as the experiment files do) is
  # benchmarked at the size it asks the tokenizer for, which sentencepiece returns exactly.
  c.model.vocab_size = c.model.vocab_size or c.tokenizer.vocab_size
  return c


def bench_run(spec: str, **model_overrides: Any) -> RunConfig:
  """The resolved run of `bench_config(spec)`, with `model_overrides` (model.<key>=value) applied first."""
  c = bench_config(spec)
  c.model.update(model_overrides)
  return config_lib.resolve(c)


def _with_batch(run: RunConfig, global_batch_size: int) -> RunConfig:
  return dataclasses.replace(run, step=dataclasses.replace(run.step, global_batch_size=global_batch_size))


def tokenizer_dir(workdir: str, spec: str) -> str:
  """Where the benchmark scripts cache the tokenizer of config `spec` under `workdir`: one folder per spec, its
  slashes flattened, so that a config given by path (absolute or relative) stays inside `workdir`."""
  return os.path.join(workdir, spec.strip("/").replace("/", "_"), "tokenizer")


def _median_step_time(train, state, batches, steps: int, repeats: int, warmup: int):
  """Median seconds per step: each repeat dispatches `steps` steps and waits once at the end."""
  for i in range(warmup):
    state, _ = train(state, batches(i))
  jax.block_until_ready(state)  # (with --warmup=0 there is no step's metrics to wait on)
  times = []
  for r in range(repeats):
    start = time.perf_counter()
    for i in range(steps):
      state, m = train(state, batches(r * steps + i))
    jax.block_until_ready(m)
    times.append((time.perf_counter() - start) / steps)
  return statistics.median(times), state


def fit_batch(run: RunConfig, fraction: float = 0.85) -> int:
  """The global batch that fills `fraction` of one device's memory, extrapolated from a compile at c's batch.

  The step's arguments (state and batch) are taken as fixed and its temporaries as linear in the batch; the
  result is a multiple of the device count. Without a reported memory limit it is c's batch unchanged.
  """
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0)
  b, num = run.step.global_batch_size, jax.device_count()
  if not limit:
    return b
  mesh = sharding.make_mesh((-1, 1, 1))
  with jax.set_mesh(mesh):
    fns = steps_lib.build(*run.step_records(), mesh)
    memory = fns.lower_train(b, run.data.seq_len).compile().memory_analysis()
  return batch_that_fits(limit * fraction, memory.argument_size_in_bytes, memory.temp_size_in_bytes, b, num)


def batch_that_fits(budget_bytes: float, argument_bytes: float, temp_bytes: float, batch: int, num_devices: int) -> int:
  """The largest global batch (a multiple of num_devices, at least num_devices) whose per-device arguments plus
  temporaries, scaled linearly from those measured at `batch`, stay within `budget_bytes`."""
  per_row = temp_bytes / max(batch // num_devices, 1)
  rows = int((budget_bytes - argument_bytes) // max(per_row, 1.0))
  return max(rows, 1) * num_devices


def _is_out_of_memory(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def bench_train(name: str, steps: int, repeats: int, warmup: int, real_data: bool, workdir: str,
                batch_size: int = 0) -> dict:
  """Compile time, memory, and median step time with synthetic (and optionally real) batches.

  `batch_size` > 0 replaces the config's global batch (see `fit_batch`).
  """

  run = bench_run(name)
  if batch_size > 0:
    run = _with_batch(run, batch_size)
  peak, peak_source = metrics_lib.peak_flops_total()
  mesh = sharding.make_mesh((-1, 1, 1))
  b, l, cfg = run.step.global_batch_size, run.data.seq_len, run.model
  with jax.set_mesh(mesh):
    fns = steps_lib.build(*run.step_records(), mesh)
    start = time.perf_counter()
    compiled = fns.lower_train(b, l).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    on_device = sharding.global_batch(batch_lib.synthetic(b, l, cfg.vocab_size), fns.batch_sharding)
    state = fns.init()
    step_s, state = _median_step_time(compiled, state, lambda i: on_device, steps, repeats, warmup)
    result = {"config": name, "model": dataclasses.asdict(cfg), "global_batch_size": b, "micro_batches": fns.accum,
              "compile_s": compile_s, "step_time_s": step_s}
    if real_data:
      data = pipeline.prepare_data(run.data, run.tokenizer,
                                   tokenizer_dir=tokenizer_dir(workdir, name))
      it = pipeline.make_train_iterator(data, global_batch_size=b, seed=0, process_index=0, process_count=1)
      real_s, state = _median_step_time(compiled, state, lambda i: sharding.global_batch(next(it), fns.batch_sharding),
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
      "peak_flops_per_s": peak, "peak_source": peak_source, **_peak_samples(),
      "mfu": tokens_per_s * flops["causal"] / peak,
      "mfu_standard_formula": tokens_per_s * flops["standard"] / peak,
      "peak_device_memory_bytes": (getattr(memory, "temp_size_in_bytes", 0)
                                   + getattr(memory, "argument_size_in_bytes", 0)),
      "host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
  })
  return result


def _peak_samples() -> dict[str, Any]:
  """Every matmul sample behind the CPU peak (FLOP/s by implementation), so the JSON shows its spread."""
  if jax.default_backend() != "cpu":
    return {}
  cpu = metrics_lib.measure_cpu_peak()  # cached: the measurement peak_flops_total() just made
  return {"peak_samples_flops_per_s": cpu.samples, "peak_winner": cpu.winner}


def bench_compile_depth(name: str) -> dict:
  """Compile time of the train step at 4 and 32 layers (scan keeps it nearly flat)."""

  out = {}
  jax.config.update("jax_enable_compilation_cache", False)
  for layers in (4, 32):
    run = bench_run(name, num_layers=layers)
    mesh = sharding.make_mesh((-1, 1, 1))
    with jax.set_mesh(mesh):
      fns = steps_lib.build(*run.step_records(), mesh)
      start = time.perf_counter()
      fns.lower_train(run.step.global_batch_size, run.data.seq_len).compile()
      out[f"compile_s_{layers}_layers"] = time.perf_counter() - start
  out["compile_ratio_32_over_4"] = out["compile_s_32_layers"] / out["compile_s_4_layers"]
  return out


DECODE_PROMPT = (2, 5, 7, 9)


def decode_lengths(values: Sequence[str | int]) -> list[int]:
  """--decode_lengths as integers; a one-line error unless they ascend and each generates past the prompt."""
  flag, example = (f"--decode_lengths={','.join(map(str, v))}" for v in (values, DECODE_LENGTHS))
  try:
    lengths = [int(v) for v in values]
  except ValueError:
    raise errors.ConfigError(f"{flag} must be whole numbers, e.g. {example}") from None
  if not lengths or lengths != sorted(set(lengths)) or lengths[0] <= len(DECODE_PROMPT):
    raise errors.ConfigError(f"{flag} must be distinct, ascending and each above the {len(DECODE_PROMPT)}-token "
                             f"prompt, e.g. {example}")
  return lengths


def bench_decode(name: str, repeats: int, lengths: Sequence[int] = DECODE_LENGTHS) -> dict:
  """Decode tokens/s at batch 1 and 8, and per-token time at growing lengths (KV cache keeps it flat)."""
  lengths = decode_lengths(lengths)
  run = bench_run(name)
  cfg = dataclasses.replace(run.model, max_len=max(run.data.seq_len, lengths[-1]))  # room to show time against length
  params = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), jax.numpy.zeros((1, 8), "int32"))["params"])
  params = jax.device_put(params, jax.devices()[0])
  out: dict[str, Any] = {}
  for batch in (1, 8):
    per_token = {}
    for length in lengths:
      times = []
      for r in range(repeats + 1):
        start = time.perf_counter()
        sampling.generate(params, cfg, list(DECODE_PROMPT), max_length=length, num_return_sequences=batch,
                          temperature=1.0, top_k=0, top_p=1.0, seed=r, eos_id=None)
        times.append(time.perf_counter() - start)
      per_token[length] = statistics.median(times[1:]) / (length - len(DECODE_PROMPT))  # first call compiles
    out[f"decode_tokens_per_s_batch{batch}"] = batch / per_token[lengths[-1]]
    out[f"decode_s_per_token_batch{batch}_by_length"] = per_token
    # What one token costs without a cache: a full forward over the whole prefix.
    out[f"no_cache_s_per_token_batch{batch}_by_length"] = {
        length: _median_forward_s(params, cfg, batch, length, repeats) for length in lengths}
  return out


def _median_forward_s(params: Any, cfg: Any, batch: int, length: int, repeats: int) -> float:
  forward = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[0])
  return metrics_lib.median_seconds(forward, params, jax.numpy.zeros((batch, length), "int32"), repeats=repeats)


def _bench_train_fitted(name: str, steps: int, repeats: int, warmup: int, real_data: bool, workdir: str) -> dict:
  """bench_train at the batch `fit_batch` picks, halving it while the step runs out of memory."""
  run = bench_run(name)
  config_batch, batch = run.step.global_batch_size, fit_batch(run)
  while True:
    try:
      r = bench_train(name, steps, repeats, warmup, real_data, workdir, batch_size=batch)
      return {**r, "config_batch_size": config_batch}
    except Exception as e:  # pylint: disable=broad-except  # XLA reports OOM as a generic runtime error
      if not _is_out_of_memory(e) or batch <= jax.device_count():
        raise
      print(f"[{name}] batch {batch} ran out of memory; trying {batch // 2}", flush=True)
      batch = max(batch // 2 // jax.device_count(), 1) * jax.device_count()


def run(configs: Sequence[str], steps: int, repeats: int, warmup: int, real_data: bool, decode: bool,
        compile_depth: bool, workdir: str, fit: bool = False,
        decode_lengths: Sequence[int] = DECODE_LENGTHS) -> list[dict]:
  results = []
  for name in configs:
    if fit:
      r = _bench_train_fitted(name, steps, repeats, warmup, real_data, workdir)
    else:
      r = bench_train(name, steps, repeats, warmup, real_data, workdir)
    if decode:
      r.update(bench_decode(name, max(repeats // 2, 1), decode_lengths))
    if compile_depth:
      r.update(bench_compile_depth(name))
    print(format_result(r), flush=True)
    results.append(r)
  return results


def format_result(r: dict) -> str:
  micro = f" ({r['micro_batches']} micro-batches)" if r.get("micro_batches", 1) > 1 else ""
  lines = [f"[{r['config']}] {r['device_count']} x {r['device_kind']}, batch {r['global_batch_size']}{micro}: "
           f"step {1000 * r['step_time_s']:.1f} ms, "
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


def _check_writable(path: str) -> None:
  """Test-opens the --json file before benchmarking, so a bad path cannot throw the measurements away."""
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise errors.ConfigError(f"--json={path}: directory {directory} does not exist; create it or pass another path")
  try:
    paths.probe_writable(path)
  except OSError as e:
    raise errors.RunError(f"cannot write --json={path} ({e.strerror or e}); pass a writable path") from None


def write_json(path: str, results: list[dict]) -> None:
  """The results with the command line and the time they were taken."""
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"argv": sys.argv, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}, f, indent=2,
              default=str)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

  def body() -> None:
    if not _CONFIGS.value:
      raise errors.ConfigError("--configs is empty; name at least one, e.g. --configs=tiny")
    for name, flag, least in (("steps", _STEPS, 1), ("repeats", _REPEATS, 1), ("warmup", _WARMUP, 0)):
      if flag.value < least:
        raise errors.ConfigError(f"--{name}={flag.value} must be at least {least}")
    if _DECODE_LENGTHS.present and not _DECODE.value:
      raise errors.ConfigError("--decode_lengths is ignored with --decode=false; drop one of them")
    lengths = decode_lengths(_DECODE_LENGTHS.value)
    if _JSON.value:
      _check_writable(_JSON.value)
    for name in _CONFIGS.value:
      bench_config(name)  # unknown names and files fail before any compile
    results = run(_CONFIGS.value, _STEPS.value, _REPEATS.value, _WARMUP.value, _REAL_DATA.value, _DECODE.value,
                  _COMPILE_DEPTH.value, _WORKDIR.value, fit=_FIT_BATCH.value, decode_lengths=lengths)
    if _JSON.value:
      write_json(_JSON.value, results)

  launch.run_main("llm_jax.bench", body)


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
