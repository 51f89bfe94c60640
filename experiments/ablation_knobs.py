"""Ablation, step 3 of 3: each model knob alone against the AdamW baseline (experiments/smoke.py at 300 steps).

Command:  python -m llm_jax.sweep --sweep=experiments/ablation_knobs.py --root=/tmp/ablation_knobs
          python -m llm_jax.sweep --report --root=/tmp/ablation_knobs
Shape:    as experiments/ablation_optimizer.py: GPT-2 family, 2 layers, width 64, 300 steps of 16 × 64 tokens,
          AdamW 3e-3 (smoke's rate), cosine with 30 warm-up steps.
"""

BASE = "experiments/smoke.py"
SEEDS = (0, 1)
# One knob at a time; the first entry is the baseline (every knob off).
ZIP = {"model.qk_norm": [False, True, False, False, False, False],
       "z_loss": [0.0, 0.0, 1e-4, 0.0, 0.0, 0.0],
       "model.logit_softcap": [0.0, 0.0, 0.0, 15.0, 0.0, 0.0],
       "model.mlp_activation": ["default", "default", "default", "default", "relu2", "default"],
       "model.tie_embeddings": [True, True, True, True, True, False]}
OVERRIDES = {
    "num_train_steps": 300,
    "global_batch_size": 16,
    "optim.warmup_steps": 30,
    "log_every": 50,
    "eval_every": 100,
    "eval_batches": 4,
    "checkpoint_every": 300,
}
