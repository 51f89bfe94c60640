"""Our jitted train step against the plain PyTorch reference: same init, same real batches, alternating timed blocks.

Command:  python tools/compare_torch.py --configs=tiny,10m,experiments/sotu_small.py:adamw --json=torch.json
          [--warmup=3 --steps=3 --repeats=3: untimed steps, steps per timed block, timed blocks]
          (bare names are variants of llm_jax/bench_shapes.py, as in `python -m llm_jax.bench`; run from the
          repository root with llm_jax installed or on PYTHONPATH)
Method:   both start from our initial parameters (tools/torch_reference.py loads them) and read the same
          packed batches of the config's corpus, taken from the grain pipeline before timing. After --warmup
          untimed steps of each, steps run in --repeats blocks of --steps: ours, then torch on the same steps,
          and so on, so load from other processes hits both alike. Reported per config: median ms/step and
          tokens/s with the spread over blocks, ours ÷ torch tokens/s, every step's loss of both, and the
          validation loss of both on the same eval batches. torch runs on os.cpu_count() threads unless
          --torch_threads says otherwise.
Defaults: 3 + 3 x 3 = 12 steps of each: tiny, 10m and sotu_small take about 10 minutes on 2 quiet cores.
Long run: --configs=tiny --warmup=50 --steps=390 --repeats=5 trains each 2,000 steps (the issue's small recipe) and
          reports both whole-run training times and validation losses at the end.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any
from typing import Sequence

import jax
import torch
import torch_reference
from absl import app
from absl import flags

from llm_jax import bench
from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import launch
from llm_jax import loop as loop_lib
from llm_jax import metrics as metrics_lib
from llm_jax import sharding
from llm_jax import steps as steps_lib
from llm_jax.data import pipeline

FLAGS = flags.FLAGS

# --configs, --steps, --repeats, --warmup, --json and --workdir are llm_jax.bench's flags (importing it defines
# them), with smaller defaults here: a step of each implementation runs per timed step. Its other flags are unused.
flags.FLAGS.set_default("configs", ["tiny", "10m", "experiments/sotu_small.py:adamw"])
flags.FLAGS.set_default("steps", 3)
flags.FLAGS.set_default("repeats", 3)
flags.FLAGS.set_default("warmup", 3)
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 4, "Validation batches both are scored on at the end.")
_DEVICE = flags.DEFINE_enum("device", "cpu", ["cpu", "cuda"], "Where torch runs (JAX uses its default backend).")
_AUTOCAST = flags.DEFINE_bool("autocast_bf16", False, "Run torch's forward under bfloat16 autocast (GPU shapes).")
# On a machine other jobs oversubscribe, torch's OpenMP threads wait on each other (2026-12-01, load 10 on 2 cores:
# 5.5 s per tiny step on 2 threads against 50 ms quiet); one thread shows what torch does there without that.
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch CPU threads; 0: os.cpu_count().")


def _prepare(name: str, c: Any, workdir: str) -> pipeline.PreparedData:
  # The same tokenizer folder as llm_jax.bench; the token store is shared through data.store_dir.
  return pipeline.prepare_data(config_lib.resolve(c).data, config_lib.resolve(c).tokenizer,
                               tokenizer_dir=bench.tokenizer_dir(workdir, name))


def _sync(device: str) -> None:
  if device == "cuda":
    torch.cuda.synchronize()


def _spread(seconds_per_step: list[float], tokens_per_step: int) -> dict[str, Any]:
  """Median and range over the timed blocks, as ms/step and tokens/s."""
  return {"ms_per_step_median": 1000 * statistics.median(seconds_per_step),
          "ms_per_step_blocks": [1000 * s for s in seconds_per_step],
          "tokens_per_s_median": tokens_per_step / statistics.median(seconds_per_step),
          "tokens_per_s_min": tokens_per_step / max(seconds_per_step),
          "tokens_per_s_max": tokens_per_step / min(seconds_per_step)}


def _alternate(train: Any, state: Any, ref: torch_reference.TorchTrainer, ours_in: list[Any],
               torch_in: list[dict[str, torch.Tensor]], warmup: int, block: int, repeats: int, device: str):
  """Runs the warm-up, then the timed blocks, each ours first and torch second on the same steps.

  Returns our final state, the seconds per step of every block of each (warm-up first) and every step's loss.
  """
  ours_s, torch_s, ours_loss, torch_loss = [], [], [], []
  for first, n in [(0, warmup)] + [(warmup + r * block, block) for r in range(repeats)]:
    start = time.perf_counter()
    out = []
    for i in range(first, first + n):
      state, m = train(state, ours_in[i])
      out.append(m["loss"])
    jax.block_until_ready(out)  # one wait per block: dispatch overlaps compute, as in the trainer's loop
    ours_s.append((time.perf_counter() - start) / n)
    ours_loss += [float(x) for x in out]
    start = time.perf_counter()
    out = [ref.step(torch_in[i]) for i in range(first, first + n)]
    _sync(device)
    torch_s.append((time.perf_counter() - start) / n)
    torch_loss += [float(x) for x in out]
  return state, ours_s, torch_s, ours_loss, torch_loss


def compare(name: str, block: int, repeats: int, warmup: int, eval_batches: int, device: str, autocast_bf16: bool,
            workdir: str) -> dict[str, Any]:
  """Trains ours and torch side by side on one config; returns timings, both loss curves and both val losses.

  Each runs `warmup` untimed steps, then `repeats` timed blocks of `block` steps, alternating with the other.
  """
  if block < 1 or repeats < 1 or warmup < 1:
    raise errors.ConfigError("--steps, --repeats and --warmup must each be at least 1 (warm-up includes compilation)")
  steps = warmup + block * repeats
  c = bench.bench_config(name)
  data = _prepare(name, c, workdir)
  mesh = sharding.make_mesh((-1, 1, 1))
  b, l = c.global_batch_size, c.data.seq_len
  with jax.set_mesh(mesh):
    run = config_lib.resolve(c).with_vocab(data.tokenizer.vocab_size)
    cfg, optim_cfg, step_cfg = run.step_records()
    fns = steps_lib.build(cfg, optim_cfg, step_cfg, mesh)
    start = time.perf_counter()
    train = fns.lower_train(b, l).compile()
    compile_s = time.perf_counter() - start
    state = fns.init()
    ref = torch_reference.TorchTrainer(cfg, config_lib.resolve(c).optim, c.num_train_steps,
                                       jax.device_get(state.params), device, autocast_bf16)
    it = pipeline.make_train_iterator(data, global_batch_size=b, seed=c.seed, process_index=0, process_count=1)
    host = [next(it) for _ in range(steps)]  # read before timing: the step is measured, not the pipeline
    ours_in = [sharding.global_batch(x, fns.batch_sharding) for x in host]
    torch_in = [torch_reference.to_torch(x, device) for x in host]
    state, ours_s, torch_s, ours_loss, torch_loss = _alternate(train, state, ref, ours_in, torch_in, warmup, block,
                                                               repeats, device)
    val = pipeline.make_eval_batches(data, batch_size=c.eval_batch_size, max_batches=eval_batches)
    our_val = loop_lib.evaluate(fns, state.params, val)["val_loss"]
  their_val = ref.evaluate([torch_reference.to_torch(x, device) for x in val])
  peak, peak_source = metrics_lib.peak_flops_total(c.peak_flops_per_device)
  flops = metrics_lib.flops_per_token(cfg, l)["causal"]
  ours, theirs = _spread(ours_s[1:], b * l), _spread(torch_s[1:], b * l)
  for side in (ours, theirs):
    side["mfu_median"] = side["tokens_per_s_median"] * flops / peak
  return {
      "config": name, "model": dataclasses.asdict(cfg), "global_batch_size": b, "seq_len": l, "steps": steps,
      "warmup_steps": warmup, "block": block, "timed_blocks": repeats, "compile_s": compile_s,
      "warmup_ms_per_step": {"ours": 1000 * ours_s[0], "torch": 1000 * torch_s[0]}, "ours": ours, "torch": theirs,
      # Every step of each, compilation included in ours (the first warm-up step): the whole run's training time.
      "train_s": {"ours": ours_s[0] * warmup + sum(ours_s[1:]) * block,
                  "torch": torch_s[0] * warmup + sum(torch_s[1:]) * block},
      "ours_over_torch_tokens_per_s": ours["tokens_per_s_median"] / theirs["tokens_per_s_median"],
      "ours_over_torch_per_block_pair": statistics.median(t / o for o, t in zip(ours_s[1:], torch_s[1:])),
      "loss_ours": ours_loss, "loss_torch": torch_loss,
      "max_abs_loss_diff": max(abs(a - t) for a, t in zip(ours_loss, torch_loss)),
      "val_loss_ours": our_val, "val_loss_torch": their_val, "eval_batches": len(val),
      "flops_per_token_causal": flops, "peak_flops_per_s": peak, "peak_source": peak_source,
      "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__, "torch_device": device,
      "torch_autocast_bf16": autocast_bf16, "jax_version": jax.__version__,
      "jax_device_kind": jax.devices()[0].device_kind, "jax_device_count": jax.device_count(),
  }


def format_result(r: dict[str, Any]) -> str:
  """Timings with their spread, the ratio, a few rows of both loss curves and both validation losses."""
  def side(s: dict[str, Any]) -> str:
    return (f"{s['ms_per_step_median']:.1f} ms/step, {s['tokens_per_s_median']:,.0f} tok/s "
            f"({s['tokens_per_s_min']:,.0f}–{s['tokens_per_s_max']:,.0f}), MFU {100 * s['mfu_median']:.1f}%")

  n = len(r["loss_ours"])
  rows = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})
  lines = [f"[{r['config']}] batch {r['global_batch_size']} x {r['seq_len']}: {r['warmup_steps']} warm-up steps, "
           f"then {r['timed_blocks']} alternating blocks of {r['block']}; torch {r['torch_version']} on "
           f"{r['torch_threads']} threads",
           f"  ours  {side(r['ours'])}", f"  torch {side(r['torch'])}",
           f"  ours / torch tokens/s: {r['ours_over_torch_tokens_per_s']:.2f}x (median over block pairs "
           f"{r['ours_over_torch_per_block_pair']:.2f}x); peak {r['peak_flops_per_s'] / 1e9:.0f} GFLOP/s",
           "  step   loss ours   loss torch   diff"]
  lines += [f"  {i + 1:>4d}   {r['loss_ours'][i]:9.5f}   {r['loss_torch'][i]:10.5f}   "
            f"{r['loss_ours'][i] - r['loss_torch'][i]:+.1e}" for i in rows]
  lines.append(f"  validation loss ({r['eval_batches']} batches): ours {r['val_loss_ours']:.5f}, torch "
               f"{r['val_loss_torch']:.5f}; max |loss diff| over steps {r['max_abs_loss_diff']:.1e}")
  lines.append(f"  {r['steps']} steps of training: ours {r['train_s']['ours']:.1f} s (with compilation), torch "
               f"{r['train_s']['torch']:.1f} s")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

  def body() -> None:
    for name in FLAGS.configs:
      bench.bench_config(name)  # unknown names fail before any data is prepared
    if _DEVICE.value == "cpu":
      torch.set_num_threads(_TORCH_THREADS.value or os.cpu_count() or 1)
    elif FLAGS["torch_threads"].present:
      raise errors.ConfigError("--torch_threads is read only with --device=cpu (CUDA kernels do not use torch's CPU "
                               "threads): drop it")
    results = []
    for name in FLAGS.configs:
      r = compare(name, FLAGS.steps, FLAGS.repeats, FLAGS.warmup, _EVAL_BATCHES.value, _DEVICE.value,
                  _AUTOCAST.value, FLAGS.workdir)
      print(format_result(r), flush=True)
      results.append(r)
    if FLAGS.json:
      bench.write_json(FLAGS.json, results)

  launch.run_main("llm_jax.compare_torch", body)


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
