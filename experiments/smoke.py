"""Smoke test: a tiny GPT-2 on the built-in corpus; what tests and CI train.

Command:  python -m llm_jax.train --config=experiments/smoke.py --workdir=/tmp/smoke
Variants: `experiments/smoke.py:llama` trains the Llama family (RoPE, RMSNorm, SwiGLU, GQA).
Hardware: 2-core x86-64 CPU, float32, one device (tests run it on 8 simulated devices: same losses).
Wall time: about 10 s end to end (30 steps take ~1 s; the rest is start-up, compilation and sampling).
Result (2026-11-28): train loss 5.0122 and validation loss 4.9765 (perplexity 145) at step 30, the
golden values pinned in tests/test_train.py; the llama variant reaches validation loss 4.9913. With the
default optimizer instead (Muon 0.02, 2026-12-01): 4.9700 and 4.9317, the second golden pair there.
"""

from llm_jax import config as config_lib

VARIANTS = ("gpt2", "llama")


def get_config(variant: str = "gpt2"):
  c = config_lib.get_config()
  c.num_train_steps = 30
  c.global_batch_size = 8
  c.data.seq_len = 64
  c.tokenizer.vocab_size = 512
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 4
  # AdamW, not the default Muon: its Newton-Schulz iterations add ~2.3 s of compilation to each of the suite's
  # many smoke runs (10.8 s against 8.5 s for this whole run); tests/test_train.py pins a Muon golden beside it.
  c.optim.name = "adamw"
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 5
  c.log_every = 10
  c.eval_every = 15
  c.eval_batches = 2
  c.eval_batch_size = 8
  c.checkpoint_every = 10
  c.sample.max_length = 24
  if variant == "llama":
    c.model.family = "llama"
    c.model.num_kv_heads = 2
  elif variant != "gpt2":
    raise ValueError(f"unknown variant {variant!r} of experiments/smoke.py; use gpt2 or llama")
  return c
