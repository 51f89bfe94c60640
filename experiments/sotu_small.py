"""README's main run: a 3.7M-parameter GPT-2 trained on the State of the Union corpus on a laptop CPU.

Command:  python -m llm_jax.train --config=experiments/sotu_small.py --workdir=workdirs/sotu_small
Variants: `experiments/sotu_small.py:llama` swaps in the Llama family (RoPE, RMSNorm, SwiGLU, 4 query
          heads sharing 2 KV heads) at the same width and depth.
Hardware: 2-core x86-64 CPU (no accelerator), float32, one device.
Wall time: 2 min 58 s on a quiet machine (2026-11-28): 5,100–5,200 tokens/s, 40–41% MFU against a
          291 GFLOP/s float32 matmul measured in the same process (7 min 02 s while other jobs shared
          the cores, before remat 'dots' was set).
Result:   gpt2, 400 steps × 16 × 128 tokens (0.8M tokens, a quarter of an epoch): train loss 4.39,
          validation loss 4.6740 at step 200 and 4.3213 (perplexity 75.3) at step 400 (2026-11-28;
          on 2026-12-01 another machine of the same kind gave 4.6715 and 4.3189, 3,900–4,400 tokens/s,
          with the code of both dates alike). Sample:
          "I love computer science has had a new fighting for the housing on that the President of the
          American people."
"""

from llm_jax import config as config_lib

VARIANTS = ("gpt2", "llama")


def get_config(variant: str = "gpt2"):
  c = config_lib.get_config()
  c.num_train_steps = 400
  c.global_batch_size = 16
  c.data.seq_len = 128
  c.tokenizer.vocab_size = 2048
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 40
  c.log_every = 20
  c.eval_every = 100
  c.eval_batches = 8
  c.eval_batch_size = 32
  c.checkpoint_every = 100
  if variant == "llama":
    c.model.family = "llama"
    c.model.num_kv_heads = 2
  elif variant != "gpt2":
    raise ValueError(f"unknown variant {variant!r} of experiments/sotu_small.py; use gpt2 or llama")
  return c
