"""Ablation, step 1 of 3: AdamW against Muon, each over a 3-value learning-rate grid (one seed).

Command:  python -m llm_jax.sweep --sweep=experiments/ablation_optimizer.py --root=/tmp/ablation_optimizer
          python -m llm_jax.sweep --report --root=/tmp/ablation_optimizer
Shape:    experiments/smoke.py (GPT-2 family, 2 layers, width 64, 4 heads, BPE 512) at 300 steps of 16 × 64
          tokens (warm-up 30, cosine), not sotu_small: sotu_small costs about 4 minutes a run on this 2-core
          machine, and this record holds 30 runs. Muon updates the weight matrices at `learning_rate`; the
          embeddings, norms and biases stay on AdamW at `adam_learning_rate` (3e-3, smoke's AdamW rate).
Result:   see experiments/results/ablation_optimizer/ and the conclusion in experiments/ablation_knobs.py.
"""

BASE = "experiments/smoke.py"
SEEDS = (0,)
ZIP = {"optim.name": ["adamw", "adamw", "adamw", "muon", "muon", "muon"],
       "optim.learning_rate": [1e-3, 3e-3, 1e-2, 0.01, 0.02, 0.05]}
OVERRIDES = {
    "num_train_steps": 300,  # a few hundred steps: under a minute a run here
    "global_batch_size": 16,
    "optim.warmup_steps": 30,  # 10% of the run
    "log_every": 50,
    "eval_every": 100,  # three points per validation curve
    "eval_batches": 4,
    "checkpoint_every": 300,
}
