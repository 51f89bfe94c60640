"""CPU levers on the whole train step: a model setting against the default in one process, XLA:CPU flags across runs.

Commands: python tools/cpu_levers.py --mode=model --configs=tiny,10m --set=compute_dtype=bfloat16
              [--steps=20 --repeats=5 --warmup=2]
          python tools/cpu_levers.py --mode=model --configs=tiny --set= \
              --compile_options=xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT
          python tools/cpu_levers.py --mode=flags --configs=tiny --rounds=3
              --xla_flags='--xla_cpu_use_onednn=true;--xla_cpu_experimental_ynn_fusion_type=dot'
          python tools/cpu_levers.py --mode=flags --configs=tiny --xla_flags=JAX_CPU_ENABLE_ASYNC_DISPATCH=false
          (bare config names are variants of llm_jax/bench_shapes.py, as in `python -m llm_jax.bench`)
Method:   --mode=model builds two train steps of one config, the default (A) and the default with --set's
          keys (B; --compile_options apply to B alone), from
          the same initial parameters on the same real batches, and after --warmup untimed steps of
          each alternates timed blocks of --steps steps (A, B, A, B, ... --repeats times) so load from other
          processes hits both alike. It prints B ÷ A tokens/s (median of the per-block-pair ratios, with their
          range), both loss curves at a few steps and both validation losses. --mode=flags cannot share a process
          (XLA reads XLA_FLAGS once, at start-up): each round runs `python -m llm_jax.bench` on synthetic batches
          once without extra flags and once per ';'-separated flag set (XLA flags and NAME=VALUE environment
          settings such as jax options), in that order, and reports each flag set's
          tokens/s ÷ the same round's baseline (median and range over --rounds).
Hardware and results: BENCHMARKS.md ("What limits the CPU figures", 2026-12-01).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any
from typing import Collection
from typing import Sequence

import jax
import ml_collections
from absl import app
from absl import flags

from llm_jax import bench
from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import launch
from llm_jax import loop as loop_lib
from llm_jax import sharding
from llm_jax import steps as steps_lib
from llm_jax.data import pipeline

FLAGS = flags.FLAGS
# --configs, --steps, --repeats, --warmup and --workdir are llm_jax.bench's flags (importing it defines them).
_MODE = flags.DEFINE_enum("mode", "model", ["model", "flags"], "What to compare (see the docstring).")
_SET = flags.DEFINE_list("set", ["compute_dtype=bfloat16"], "--mode=model: B's settings, key=value: "
                          "keys of config.model, or dotted paths of the config (grad_accum_steps=4).")
_OPTIONS = flags.DEFINE_list("compile_options", [], "--mode=model: XLA options B's step is compiled with, key=value "
                             "(enums by name, e.g. xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_DOT): "
                             "an XLA flag measured in one process.")
_XLA_FLAGS = flags.DEFINE_string("xla_flags", "", "--mode=flags: ';'-separated sets to try, each of XLA flags "
                                 "(--name=value) and environment settings read at start-up (NAME=VALUE).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "--mode=flags: rounds of (baseline, each flag set).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 4, "--mode=model: validation batches both are scored on.")
_MESH_A = flags.DEFINE_list("mesh_a", ["-1", "1", "1"], "--mode=model: A's (data, fsdp, tensor) mesh; -1 takes the "
                            "rest of the devices (run with --xla_force_host_platform_device_count to have several).")
_MESH_B = flags.DEFINE_list("mesh_b", ["-1", "1", "1"], "--mode=model: B's mesh, as --mesh_a.")


def with_settings(c: Any, settings: Sequence[str]) -> Any:
  """A copy of config `c` with 'key=value' settings, each value parsed as the key's default type: a key of
  config.model (compute_dtype=bfloat16) or a dotted path from the config's top (grad_accum_steps=4,
  optim.weight_decay=0.0)."""
  c = ml_collections.ConfigDict(c.to_dict())
  for item in settings:
    key, sep, value = item.partition("=")
    parent, _, leaf = (f"model.{key}" if key in c.model else key).rpartition(".")
    node = c
    for part in parent.split(".") if parent else ():
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if (not sep or not isinstance(node, ml_collections.ConfigDict) or leaf not in node
        or isinstance(node[leaf], ml_collections.ConfigDict)):
      raise errors.ConfigError(f"--set={item!r} is not key=value with a key of config.model (compute_dtype=bfloat16) "
                               "or a dotted path of the config (grad_accum_steps=4)")
    kind = type(node[leaf])
    node[leaf] = value.lower() in ("1", "true") if kind is bool else kind(value)
  return c


def _timed_blocks(sides: list[tuple[Any, Any]], batches: list[list[Any]], warmup: int, block: int, repeats: int):
  """Runs every side's warm-up, then `repeats` rounds of one timed block per side (on its own copy of the
  batches); seconds/step and losses."""
  seconds = [[] for _ in sides]
  losses = [[] for _ in sides]
  states = [state for _, state in sides]
  for first, n in [(0, warmup)] + [(warmup + r * block, block) for r in range(repeats)]:
    for s, (train, _) in enumerate(sides):  # (the steps are compiled ahead: --warmup=0 times no compilation)
      start = time.perf_counter()
      out = []
      for i in range(first, first + n):
        states[s], m = train(states[s], batches[s][i])
        out.append(m["loss"])
      jax.block_until_ready(out)
      seconds[s].append((time.perf_counter() - start) / max(n, 1))
      losses[s] += [float(x) for x in out]
  return states, [x[1:] for x in seconds], losses


def _mesh(shape: Sequence[int]) -> jax.sharding.Mesh:
  """A mesh of `shape` over the first devices it needs (all of them when an axis is -1)."""
  shape = [int(n) for n in shape]
  size = math.prod(shape)
  return sharding.make_mesh(shape, None if size < 0 else jax.devices()[:size])


def compare_model(name: str, settings: Sequence[str], block: int, repeats: int, warmup: int, eval_batches: int,
                  workdir: str, options: Sequence[str] = (),
                  meshes: Sequence[Sequence[int]] = ((-1, 1, 1), (-1, 1, 1))) -> dict[str, Any]:
  """Default (A) against the default with `settings` and XLA compile `options`
  (B) on config `name`, each on its mesh of `meshes`: speed ratio and both loss curves."""
  compile_options = [dict(o.partition("=")[::2] for o in opts) for opts in ((), options)]
  c_a = bench.bench_config(name)
  c_b = with_settings(c_a, settings)
  run_a = config_lib.resolve(c_a)
  data = pipeline.prepare_data(run_a.data, run_a.tokenizer,
                               tokenizer_dir=bench.tokenizer_dir(workdir, name))
  b, l = c_a.global_batch_size, c_a.data.seq_len
  built, sides = [], []
  for c, shape in zip((c_a, c_b), meshes):
    mesh = _mesh(shape)
    with jax.set_mesh(mesh):
      cfg, optim_cfg, step_cfg = config_lib.resolve(c).step_records()
      built.append((mesh, cfg, steps_lib.build(cfg, optim_cfg, step_cfg, mesh)))
  with jax.set_mesh(built[0][0]):
    state_a = built[0][2].init()
    # B starts from A's very state (a copy, on B's mesh: steps donate theirs), whatever order B's layers create
    # parameters in.
    states = [state_a, jax.device_put(jax.tree.map(jax.numpy.copy, state_a), built[1][2].state_shardings)]
  for (mesh, _, fns), state, opts in zip(built, states, compile_options):
    with jax.set_mesh(mesh):
      sides.append((fns.lower_train(b, l).compile(opts), state))
  it = pipeline.make_train_iterator(data, global_batch_size=b, seed=c_a.seed, process_index=0, process_count=1)
  host = [next(it) for _ in range(warmup + block * repeats)]
  batches = [[sharding.global_batch(x, fns.batch_sharding) for x in host] for _, _, fns in built]
  states, seconds, losses = _timed_blocks(sides, batches, warmup, block, repeats)
  val = pipeline.make_eval_batches(data, batch_size=c_a.eval_batch_size, max_batches=eval_batches)
  val_loss = []
  for (mesh, _, fns), state in zip(built, states):
    with jax.set_mesh(mesh):
      val_loss.append(loop_lib.evaluate(fns, state.params, val)["val_loss"])
  ratios = [a / b_s for a, b_s in zip(seconds[0], seconds[1])]
  return {"config": name, "set": list(settings) + list(options),
          "mesh_a": list(built[0][0].shape.values()), "mesh_b": list(built[1][0].shape.values()),
          "tokens_per_step": b * l, "warmup": warmup,
          "block": block, "repeats": repeats, "ms_per_step_a": [1000 * s for s in seconds[0]],
          "ms_per_step_b": [1000 * s for s in seconds[1]], "b_over_a_tokens_per_s": statistics.median(ratios),
          "b_over_a_min": min(ratios), "b_over_a_max": max(ratios), "loss_a": losses[0], "loss_b": losses[1],
          "val_loss_a": val_loss[0], "val_loss_b": val_loss[1]}


def format_model(r: dict[str, Any]) -> str:
  n = len(r["loss_a"])
  rows = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})
  meshes = "" if r["mesh_a"] == r["mesh_b"] else f" (mesh A {r['mesh_a']}, B {r['mesh_b']})"
  lines = [f"[{r['config']}] B = default + {','.join(r['set'])}{meshes}: {r['repeats']} alternating blocks of "
           f"{r['block']} after {r['warmup']} warm-up steps",
           f"  A {statistics.median(r['ms_per_step_a']):.1f} ms/step, B {statistics.median(r['ms_per_step_b']):.1f} "
           f"ms/step; B / A tokens/s {r['b_over_a_tokens_per_s']:.3f}x (block pairs {r['b_over_a_min']:.3f}–"
           f"{r['b_over_a_max']:.3f})", "  step    loss A    loss B      B - A"]
  lines += [f"  {i + 1:>4d}  {r['loss_a'][i]:8.5f}  {r['loss_b'][i]:8.5f}  {r['loss_b'][i] - r['loss_a'][i]:+.2e}"
            for i in rows]
  lines.append(f"  validation loss: A {r['val_loss_a']:.5f}, B {r['val_loss_b']:.5f}")
  return "\n".join(lines)


def split_flag_set(flag_set: str) -> tuple[str, dict[str, str]]:
  """A flag set's XLA flags (`--name=value`) and environment settings (`NAME=VALUE`, e.g. a jax option read at
  start-up such as JAX_CPU_ENABLE_ASYNC_DISPATCH=false); anything else is a ValueError."""
  xla, env = [], {}
  for token in flag_set.split():
    name, eq, value = token.partition("=")
    if token.startswith("--"):
      xla.append(token)
    elif eq and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
      env[name] = value
    else:
      raise errors.ConfigError(f"{token!r} in --xla_flags is neither an XLA flag (--name=value) nor an environment "
                               "setting (NAME=VALUE)")
  return " ".join(xla), env


def _bench_once(name: str, flag_set: str, steps: int, repeats: int, warmup: int) -> float:
  """Tokens/s of one `python -m llm_jax.bench` process on synthetic batches, started with `flag_set`'s XLA_FLAGS
  (after those already in the environment) and environment settings."""
  xla_flags, extra_env = split_flag_set(flag_set)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "bench.json")
    env = {**os.environ, **extra_env, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()}
    subprocess.run([sys.executable, "-m", "llm_jax.bench", f"--configs={name}", f"--steps={steps}",
                    f"--repeats={repeats}", f"--warmup={warmup}", "--real_data=false", "--decode=false",
                    f"--json={out}"], env=env, check=True, stdout=subprocess.DEVNULL)
    with open(out, encoding="utf-8") as f:
      return json.load(f)["results"][0]["tokens_per_s"]


def compare_flags(name: str, flag_sets: Sequence[str], rounds: int, steps: int, repeats: int,
                  warmup: int) -> dict[str, Any]:
  """Each flag set's tokens/s over the same round's baseline (no extra flags), over `rounds` rounds."""
  samples: dict[str, list[float]] = {f: [] for f in ("", *flag_sets)}
  for _ in range(rounds):
    for f in samples:
      samples[f].append(_bench_once(name, f, steps, repeats, warmup))
  ratios = {f: [s / b for s, b in zip(samples[f], samples[""])] for f in flag_sets}
  return {"config": name, "rounds": rounds, "tokens_per_s": samples,
          "over_baseline": {f: {"median": statistics.median(r), "min": min(r), "max": max(r)}
                            for f, r in ratios.items()}}


# The flags each mode reads alone; one given to the other mode would be ignored.
MODE_FLAGS = {"model": ("set", "compile_options", "eval_batches", "mesh_a", "mesh_b"),
              "flags": ("xla_flags", "rounds")}


def check_mode_flags(mode: str, given: Collection[str]) -> None:
  """Refuses the flags in `given` (names of flags set on the command line) that `mode` would ignore, in one line."""
  ignored = [f"--{name}" for other, names in MODE_FLAGS.items() if other != mode for name in names if name in given]
  if ignored:
    raise errors.ConfigError(f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} read only by "
                             f"--mode={'flags' if mode == 'model' else 'model'}, not --mode={mode}: drop "
                             f"{'it' if len(ignored) == 1 else 'them'} or change --mode")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

  def body() -> None:
    check_mode_flags(_MODE.value, {name for names in MODE_FLAGS.values() for name in names if FLAGS[name].present})
    results = []
    for name in FLAGS.configs:
      if _MODE.value == "model":
        r = compare_model(name, _SET.value, FLAGS.steps, FLAGS.repeats, FLAGS.warmup, _EVAL_BATCHES.value,
                          FLAGS.workdir, _OPTIONS.value, (_MESH_A.value, _MESH_B.value))
        print(format_model(r), flush=True)
      else:
        flag_sets = [f.strip() for f in _XLA_FLAGS.value.split(";") if f.strip()]
        if not flag_sets:
          raise errors.ConfigError("--mode=flags needs --xla_flags='--flag=value[;--other=value]'")
        for f in flag_sets:
          split_flag_set(f)  # a malformed set fails before the first round, not after it
        r = compare_flags(name, flag_sets, _ROUNDS.value, FLAGS.steps, FLAGS.repeats, FLAGS.warmup)
        for f, s in r["over_baseline"].items():
          print(f"[{name}] {f}: {s['median']:.3f}x baseline tokens/s ({s['min']:.3f}–{s['max']:.3f}, "
                f"{r['rounds']} rounds)", flush=True)
      results.append(r)
    if FLAGS.json:
      bench.write_json(FLAGS.json, results)

  launch.run_main("llm_jax.cpu_levers", body)


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
