"""Ablation, step 2 of 3: AdamW and Muon at the best learning rate of step 1, three seeds each.

Command:  python -m llm_jax.sweep --sweep=experiments/ablation_optimizer_seeds.py --root=/tmp/ablation_optimizer_seeds
          python -m llm_jax.sweep --report --root=/tmp/ablation_optimizer_seeds
Shape:    as experiments/ablation_optimizer.py (smoke model, 300 steps of 16 × 64 tokens). AdamW 3e-3 was the
          best of 1e-3, 3e-3, 1e-2; Muon 0.05 the best of 0.01, 0.02, 0.05 when this step was started (0.1 was
          tried afterwards and was worse, 3.5842). The two seed-0 runs are step 1's, copied into this root
          (same settings, so the runner skips them; the knob sweep's baseline reproduced AdamW seed 0 and
          seed 2 to the last digit, 3.6723 and 3.7240). This record ran with --root=/tmp/rc/ablation_optimizer_seeds.
Result:   final validation loss, mean ± std over seeds 0, 1, 2 (experiments/results/ablation_optimizer_seeds/):
            Muon 0.05   3.5085 ± 0.0200   (3.4871, 3.5117, 3.5268)
            AdamW 3e-3  3.7316 ± 0.0634   (3.6723, 3.7984, 3.7240)
          Muon is 0.223 lower, beyond the seed-noise mark († : 2·sqrt(0.020²/3 + 0.063²/3) = 0.077), and lower
          on every seed. Tokens/s (11,135 ± 3,711 against 13,731 ± 3,923) are dominated by other jobs' load.
"""

BASE = "experiments/smoke.py"
SEEDS = (0, 1, 2)
ZIP = {"optim.name": ["adamw", "muon"], "optim.learning_rate": [3e-3, 0.05]}
OVERRIDES = {
    "num_train_steps": 300,
    "global_batch_size": 16,
    "optim.warmup_steps": 30,
    "log_every": 50,
    "eval_every": 100,
    "eval_batches": 4,
    "checkpoint_every": 300,
}
