"""README's main run: a 3.7M-parameter GPT-2 trained on the State of the Union corpus on a laptop CPU.

Command:  python -m llm_jax.train --config=experiments/sotu_small.py --workdir=workdirs/sotu_small
Variants: `experiments/sotu_small.py:llama` swaps in the Llama family (RoPE, RMSNorm, SwiGLU, 4 query
          heads sharing 2 KV heads) at the same width and depth; `:adamw` is the recipe before Muon became the
          default (AdamW 3e-3), which the fine-tuning, party and ablation records of 2026-12-01 start from.
Hardware: 2-core x86-64 CPU (no accelerator), float32, one device.
Wall time: 5 min 26 s on a quiet machine (2026-12-01, token store and tokenizer cached): 2,380–3,200 tokens/s,
          32–43% MFU (model FLOPs; Muon's own are not counted) against a 192 GFLOP/s float32 matmul measured in
          the same process. Muon's step takes about 1.34× AdamW's here (experiments/ablation_knobs.py); the
          :adamw variant ran in 2 min 58 s (2026-11-28).
Result:   gpt2, 400 steps × 16 × 128 tokens (0.8M tokens, a quarter of an epoch), Muon 0.02 on the weight
          matrices and AdamW 3e-3 on the rest: train loss 4.09, validation loss 4.6465 at step 100, 4.3750 at
          200, 4.1578 at 300 and 4.0151 (perplexity 55.4) at step 400 (2026-12-01; the :adamw variant: 4.3189,
          perplexity 75.1). Sample:
          "I love computer science which will be recently expected to the Federal Governments for the public
          service of our citizens of the Constitution, and will be apprehended to be as to the Executive."
"""

from llm_jax import config as config_lib

VARIANTS = ("gpt2", "llama", "adamw")


def get_config(variant: str = "gpt2"):
  c = config_lib.get_config()
  c.num_train_steps = 400
  c.global_batch_size = 16
  c.data.seq_len = 128
  c.tokenizer.vocab_size = 2048
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.optim.warmup_steps = 40
  c.log_every = 20
  c.eval_every = 100
  c.eval_batches = 8
  c.eval_batch_size = 32
  c.checkpoint_every = 100
  if variant == "llama":
    c.model.family = "llama"
    c.model.num_kv_heads = 2
  elif variant == "adamw":  # the recipe up to 2026-12-01, which the fine-tuning and party records start from
    c.optim.name = "adamw"
    c.optim.learning_rate = 3e-3
  elif variant != "gpt2":
    raise ValueError(f"unknown variant {variant!r} of experiments/sotu_small.py; use gpt2, llama or adamw")
  return c
