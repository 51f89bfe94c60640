"""Ablation, step 2 of 3: AdamW and Muon on sotu_small at the best learning rate of step 1, three seeds each.

Command:  python -m llm_jax.sweep --sweep=experiments/ablation_optimizer_seeds.py \
            --root=/tmp/ablation_optimizer_seeds
          python -m llm_jax.sweep --report --root=/tmp/ablation_optimizer_seeds
Shape:    as experiments/ablation_optimizer.py (sotu_small as it is). AdamW 3e-3 was the best of 1e-3, 3e-3, 1e-2;
          Muon 0.02 the best of 0.02 and 0.05 when this step was started (0.01, run afterwards: see step 1).
          The seed-0 runs are step 1's, copied into this root (same settings, so the runner skips them).
Hardware: as step 1 (the shared 2-core CPU, load average 6-11; 14-19 minutes a run, about 3 quietly).
Result:   final validation loss, mean ± std over seeds 0, 1, 2 (experiments/results/ablation_optimizer_seeds/):
            Muon 0.02   4.0219 ± 0.0124   (4.0151, 4.0362, 4.0144)
            AdamW 3e-3  4.3148 ± 0.0036   (4.3189, 4.3124, 4.3130)
          Muon is 0.293 lower, twenty times the seed-noise mark († : 2·sqrt(0.0124²/3 + 0.0036²/3) = 0.015), and
          lower on every seed. The same sign and a
          similar size as the smoke-shape pilot (Muon 0.05 3.5085 ± 0.0200 against AdamW 3e-3 3.7316 ± 0.0634,
          experiments/results/pilot_smoke/ablation_optimizer_seeds/). Tokens/s and wall time are load, not
          optimizer: the cost of Muon's Newton-Schulz iterations (a few small matrix products per weight matrix
          per step) is below what this record can resolve.
          This record ran with --root=/tmp/abl/ablation_optimizer_seeds.
"""

BASE = "experiments/sotu_small.py:adamw"  # the recipe when this ran; Muon became the default after
SEEDS = (0, 1, 2)
ZIP = {"optim.name": ["adamw", "muon"], "optim.learning_rate": [3e-3, 0.02]}
OVERRIDES = {"checkpoint_every": 400}  # one checkpoint, at the end
