"""The named shapes `python -m llm_jax.bench` and the tools in tools/ measure (see BENCHMARKS.md), as configs.

They live in the package so that the installed `llm_jax.bench` finds them without a repository checkout.
Command:  python -m llm_jax.bench --configs=tiny,10m   (a bare name is a shape of this module; any
          `path.py:variant` works too, e.g. --configs=experiments/sotu_small.py; from a checkout this file is
          also a config file, e.g. python -m llm_jax.train --config=llm_jax/bench_shapes.py:llama_1b)
Variants: smoke       2 layers x 64, context 64, batch 8: the bench's own test
          tiny        4 layers x 128, 4 heads, context 64, batch 12 (the nanoGPT "small recipe" shape)
          tiny_2k     tiny trained as a run, not timed as a step: 2,000 steps, AdamW 1e-3, 100 warm-up steps,
                      cosine to 1e-4 (tools/compare_torch.py's long run; the shape's loss comparison)
          10m         6 layers x 384, 6 heads, context 256, batch 64 (10.6M parameters)
          llama_500m  24 layers x 1280, 20 heads sharing 4 KV heads, context 2048, batch 16, bf16, attention
                      'auto' (splash on TPU, cuDNN on GPU): for GPU/TPU
          gpt2_125m   12 layers x 768, 12 heads, context 2048, batch 32, vocabulary 50,304 (GPT-2 small)
          gpt2_350m   24 layers x 1024, 16 heads, context 2048, batch 16, vocabulary 50,304 (GPT-2 medium)
          llama_1b    16 layers x 2048, 32 heads sharing 8 KV heads, MLP 8192, context 2048, batch 8,
                      vocabulary 32,000, tied (1.04B parameters, the Llama-3.2-1B body)
                      These three are tools/gpu_bench.sh's shapes: bf16 compute, attention_impl 'auto'
                      (cuDNN's fused kernel on GPU, splash on TPU), remat 'dots'; the batches are starting
                      points for one GPU of about 80 GB, which `--fit_batch` rescales to the memory the
                      device reports. Their tokenizer has 8,192 pieces (what the built-in corpus can train)
                      inside the larger embedding, so the real-data runs and the torch comparison work too.
Hardware and results: BENCHMARKS.md (2026-11-28: tiny 49.9 ms/step, 10m 10.35 s/step on 2 CPU cores).
Every variant but tiny_2k: AdamW at a constant learning rate (no warm-up), vocabulary 512 (llama_500m: 32,000).
The CPU shapes keep the default remat policy 'auto', which on XLA:CPU recomputes the dots in the backward pass
(faster than saving them there: 10m 10.2 s vs 12.9 s per fwd+bwd, tiny 48 vs 68 ms, because saved activations are
re-laid-out by copy kernels for the weight gradients); the accelerator shapes set 'dots' themselves, for memory.
"""

from llm_jax import config as config_lib
from llm_jax import errors

VARIANTS = ("smoke", "tiny", "tiny_2k", "10m", "llama_500m", "gpt2_125m", "gpt2_350m", "llama_1b")
_SHAPES = {
    # layers, width, heads, kv heads, context, batch, vocabulary
    "smoke": (2, 64, 4, 4, 64, 8, 512),
    "tiny": (4, 128, 4, 4, 64, 12, 512),
    "10m": (6, 384, 6, 6, 256, 64, 512),
    "llama_500m": (24, 1280, 20, 4, 2048, 16, 32000),
    "gpt2_125m": (12, 768, 12, 12, 2048, 32, 50304),
    "gpt2_350m": (24, 1024, 16, 16, 2048, 16, 50304),
    "llama_1b": (16, 2048, 32, 8, 2048, 8, 32000),
}
# The accelerator shapes of tools/gpu_bench.sh.
_GPU = ("gpt2_125m", "gpt2_350m", "llama_1b")


def get_config(variant: str = "tiny"):
  if variant not in VARIANTS:
    raise errors.ConfigError(f"unknown bench config {variant!r}; choose from {', '.join(VARIANTS)}")
  layers, width, heads, kv_heads, context, batch, vocab = _SHAPES[variant.removesuffix("_2k")]
  c = config_lib.get_config()
  c.model.update({"num_layers": layers, "d_model": width, "num_heads": heads, "num_kv_heads": kv_heads,
                  "vocab_size": vocab})
  c.tokenizer.vocab_size = vocab
  c.data.seq_len = context
  c.global_batch_size = batch
  c.num_train_steps = 1000
  c.optim.name = "adamw"  # what the PyTorch reference runs and BENCHMARKS.md's step times were measured with
  c.optim.learning_rate = 3e-3
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  if variant == "tiny_2k":
    c.num_train_steps = 2000
    c.optim.update({"learning_rate": 1e-3, "schedule": "cosine", "warmup_steps": 100, "min_lr_ratio": 0.1})
  if variant == "llama_500m":
    c.model.update({"family": "llama", "compute_dtype": "bfloat16", "attention_impl": "auto", "remat_policy": "dots"})
  if variant in _GPU:
    c.model.update({"family": "llama" if variant.startswith("llama") else "gpt2", "compute_dtype": "bfloat16",
                    "attention_impl": "auto", "remat_policy": "dots", "d_ff": 8192 if variant == "llama_1b" else 0})
    c.tokenizer.vocab_size = 8192
  return c
