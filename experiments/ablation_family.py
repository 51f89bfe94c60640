"""Ablation: GPT-2 family (learned positions, LayerNorm, GELU, biases) against the Llama family (RoPE,
RMSNorm, SwiGLU, 4 query heads sharing 2 KV heads) at the same width and depth, on the built-in corpus.

Command:  python -m llm_jax.sweep --sweep=experiments/ablation_family.py --root=workdirs/ablation_family
          python -m llm_jax.sweep --sweep=experiments/ablation_family.py --root=workdirs/ablation_family --report
Hardware: 2-core x86-64 CPU, float32, one device.
Result:   experiments/results/ablation_family/README.md (table, plots, conclusion, wall time).
"""

BASE = "experiments/sotu_small.py"
SEEDS = (0, 1)
ZIP = {"model.family": ["gpt2", "llama"], "model.num_kv_heads": [0, 2]}  # each family as it is usually built
OVERRIDES = {"num_train_steps": 300, "optim.warmup_steps": 30, "eval_every": 50, "checkpoint_every": 100}
