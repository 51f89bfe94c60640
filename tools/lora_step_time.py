"""`python tools/lora_step_time.py [--rounds=5 --steps=5]`: trainable parameters and train-step time of full
fine-tuning against LoRA at sotu_small's shape (4 layers, width 256, 16 x 128 tokens, vocabulary 2048).

Both steps are built by `steps.build` from experiments/sft_sotu.py's two variants (LoRA: rank 8 on q, k, v, o,
mlp_in, mlp_out), on synthetic batches, one device, float32. Timing alternates the two (`--steps` steps of one,
then of the other, `--rounds` times) and reports medians per step, so load from other jobs falls on both alike.

Result (2026-12-01, 2-core CPU shared with other jobs, load average about 14, `--rounds=5 --steps=3`): full
fine-tuning trains 3,716,608 parameters (7,433,216 in AdamW's moments), median 2,951 ms/step; LoRA trains 147,456
(294,912 in the moments, 4.0%), median 3,825 ms/step: 1.30x slower. At this size the step is dominated by the
forward and backward activations, which LoRA does not shrink, and the rank-8 adapters add 24 pairs of thin matmuls
per step; the weight gradients and optimizer update it saves are a small share. LoRA's gain here is memory
(optimizer state, checkpoints of 0.6 MB), not speed.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm_jax import batch as batch_lib  # noqa: E402  pylint: disable=wrong-import-position
from llm_jax import config as config_lib
from llm_jax import lora  # noqa: E402  pylint: disable=wrong-import-position
from llm_jax import sharding  # noqa: E402  pylint: disable=wrong-import-position
from llm_jax import steps as steps_lib
from llm_jax.model import count_params  # noqa: E402  pylint: disable=wrong-import-position

VOCAB = 2048


def _variant(name: str):
  c = config_lib.from_file(f"experiments/sft_sotu.py:{name}")
  c.init_params_from = ""  # shapes only: no base run needed (LoRA's base is the full run's initial weights)
  c.model.update(num_layers=4, d_model=256, num_heads=4, vocab_size=VOCAB)
  return c


def _timed(fns, state, batch, steps: int):
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = fns.train(state, batch)
  jax.block_until_ready(metrics["loss"])
  return state, (time.perf_counter() - start) / steps


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with jax.set_mesh(mesh):
    full = steps_lib.build(*config_lib.check(_variant("full")).with_vocab(VOCAB).step_records(), mesh)
    adapted = steps_lib.build(*config_lib.check(_variant("lora")).with_vocab(VOCAB).step_records(), mesh)
    full_state = full.init()
    base = jax.device_get(lora.split(full_state.params)[0])  # a copy: the full step donates its state
    adapted = adapted.with_base(jax.device_put(base, adapted.base_shardings))
    adapted_state = adapted.init()
    batch = sharding.global_batch(batch_lib.synthetic(16, 128, VOCAB), full.batch_sharding)
    states, times = {"full": full_state, "lora": adapted_state}, {"full": [], "lora": []}
    fns = {"full": full, "lora": adapted}
    for name in states:  # compile and warm up
      states[name], _ = _timed(fns[name], states[name], batch, 2)
    for _ in range(args.rounds):
      for name in states:
        states[name], seconds = _timed(fns[name], states[name], batch, args.steps)
        times[name].append(seconds)
  result = {name: {"trainable_params": count_params(states[name].params),
                   "opt_state_params": sum(x.size for x in jax.tree.leaves(states[name].opt_state) if x.ndim),
                   "median_step_ms": round(1e3 * statistics.median(times[name]), 1),
                   "step_ms": [round(1e3 * t, 1) for t in times[name]]} for name in states}
  result["lora_over_full_step_time"] = round(result["lora"]["median_step_ms"] / result["full"]["median_step_ms"], 3)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
