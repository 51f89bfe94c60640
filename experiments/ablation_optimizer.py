"""Ablation, step 1 of 3: AdamW against Muon, each over a 3-value learning-rate grid (one seed).

Command:  python -m llm_jax.sweep --sweep=experiments/ablation_optimizer.py --root=/tmp/ablation_optimizer
          python -m llm_jax.sweep --report --root=/tmp/ablation_optimizer
Shape:    experiments/smoke.py (GPT-2 family, 2 layers, width 64, 4 heads, BPE 512) at 300 steps of 16 × 64
          tokens (warm-up 30, cosine), not sotu_small: sotu_small costs about 4 minutes a run on this 2-core
          machine, and this record holds 30 runs. Muon updates the weight matrices at `learning_rate`; the
          embeddings, norms and biases stay on AdamW at `adam_learning_rate` (3e-3, smoke's AdamW rate).
Hardware: 2-core x86-64 CPU shared with three other jobs, float32, 8 simulated devices are not used (one device);
          2026-12-01, 0m35s–3m57s a run depending on the load (so tokens/s, MFU and wall time are noise here).
Result:   final validation loss, one seed (experiments/results/ablation_optimizer/results.md):
            AdamW 1e-3 3.9612 · 3e-3 3.6723 · 1e-2 4.2151;  Muon 0.01 3.5809 · 0.02 3.5086 · 0.05 3.4871 · 0.1 3.5842.
          Both optima are inside their grids (AdamW 3e-3, Muon 0.05). Seeds at those rates: step 2,
          experiments/ablation_optimizer_seeds.py; the conclusion for all three steps is in
          experiments/ablation_knobs.py. (This record ran with --root=/tmp/rc/ablation_optimizer.)
"""

BASE = "experiments/smoke.py"
SEEDS = (0,)
# Muon's 0.1 was added after 0.05 came out best of its first three (the optimum was at the grid's edge).
ZIP = {"optim.name": ["adamw", "adamw", "adamw", "muon", "muon", "muon", "muon"],
       "optim.learning_rate": [1e-3, 3e-3, 1e-2, 0.01, 0.02, 0.05, 0.1]}
OVERRIDES = {
    "num_train_steps": 300,  # a few hundred steps: under a minute a run here
    "global_batch_size": 16,
    "optim.warmup_steps": 30,  # 10% of the run
    "log_every": 50,
    "eval_every": 100,  # three points per validation curve
    "eval_batches": 4,
    "checkpoint_every": 300,
}
