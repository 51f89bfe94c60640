"""Ablation, step 1 of 3: AdamW against Muon on sotu_small, each over a 3-value learning-rate grid (one seed).

Command:  python -m llm_jax.sweep --sweep=experiments/ablation_optimizer.py --root=/tmp/ablation_optimizer
          python -m llm_jax.sweep --report --root=/tmp/ablation_optimizer
Shape:    experiments/sotu_small.py:adamw, sotu_small as it was then (GPT-2 family, 4 layers, width 256, BPE
          2048, 400 steps of 16 × 128 tokens, warm-up 40, cosine). Muon updates the weight matrices at
          `learning_rate`; the embeddings, norms, biases and the (tied) head stay on AdamW at
          `adam_learning_rate` (3e-3, sotu_small's AdamW rate).
Hardware: 2-core x86-64 CPU, float32, one device, 2026-12-01, shared with test suites, benchmarks and up to three
          other training runs (load average 6-11): 13-28 minutes a run against about 3 quietly, so the tokens/s,
          MFU and wall-time columns of the report measure the load, not the optimizers.
Result:   final validation loss, one seed (experiments/results/ablation_optimizer/results.md):
            AdamW 1e-3 4.3377 · 3e-3 4.3189 · 1e-2 5.3717;  Muon 0.01 4.0472 · 0.02 4.0151 · 0.05 4.0952.
          Both optima are inside their grids (AdamW 3e-3, sotu_small's own rate; Muon 0.02). The grid first
          held Muon 0.1 in place of 0.01; with 0.02 better than 0.05 the optimum sat at the grid's low edge, so
          the 0.1 run was stopped and 0.01 run instead. Seeds at the two optima: step 2,
          experiments/ablation_optimizer_seeds.py; the conclusion for all three steps is in
          experiments/ablation_knobs.py. This record ran with --root=/tmp/abl/ablation_optimizer.
Pilot:    the same grid at the smoke shape (2 layers, width 64, 300 steps of 16 × 64 tokens; 137K parameters),
          experiments/results/pilot_smoke/ablation_optimizer/: AdamW 1e-3 3.9612 · 3e-3 3.6723 · 1e-2 4.2151;
          Muon 0.01 3.5809 · 0.02 3.5086 · 0.05 3.4871 · 0.1 3.5842 (BASE="experiments/smoke.py" with
          OVERRIDES num_train_steps=300, global_batch_size=16, optim.warmup_steps=30, eval_batches=4).
"""

BASE = "experiments/sotu_small.py:adamw"  # the recipe when this ran; Muon became the default after
SEEDS = (0,)
ZIP = {"optim.name": ["adamw", "adamw", "adamw", "muon", "muon", "muon"],
       "optim.learning_rate": [1e-3, 3e-3, 1e-2, 0.01, 0.02, 0.05]}
OVERRIDES = {"checkpoint_every": 400}  # one checkpoint, at the end
