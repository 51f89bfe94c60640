"""Ablation: the GPT-2 family (learned positions, LayerNorm, GELU, biases) against the Llama family (RoPE,
RMSNorm, SwiGLU, 4 query heads sharing 2 KV heads) at the same width and depth on the built-in corpus.

Command:  python -m llm_jax.sweep --sweep=experiments/ablation_family.py --root=/tmp/ablation_family
          python -m llm_jax.sweep --report --root=/tmp/ablation_family
Runs:     2 families × 3 seeds of experiments/sotu_small.py:adamw (sotu_small as it was then), shortened to
          250 steps of 16 × 128 tokens.
Hardware: 2-core x86-64 CPU, float32, one device; 12 min 58 s for the six runs (2026-11-28, 2m01s–2m20s
          each, other jobs sharing the machine).
Result:   Llama 4.6965 ± 0.1147, GPT-2 4.9178 ± 0.1629 final validation loss (mean ± std over 3 seeds):
          within the seed noise, and reversed at 300 steps with a 30-step warm-up. Table, plots and
          conclusion: experiments/results/ablation_family/README.md.
"""

BASE = "experiments/sotu_small.py:adamw"  # the recipe when this ran; Muon became the default after
SEEDS = (0, 1, 2)
# Each family as it is usually built: the Llama family with grouped-query attention.
ZIP = {"model.family": ["gpt2", "llama"], "model.num_kv_heads": [0, 2]}
OVERRIDES = {
    "num_train_steps": 250,  # sotu_small's 400 steps × 6 runs would take about 20 minutes here
    "optim.warmup_steps": 25,  # 10% of the run, as sotu_small's 40 of 400
    "eval_every": 50,  # five points per validation curve
    "checkpoint_every": 125,
}
