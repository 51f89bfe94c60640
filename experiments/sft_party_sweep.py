"""The party task's fine-tuned rows as one sweep: full SFT and LoRA (experiments/sft_party.py), three seeds each,
with the test accuracy scored in the run and carried into the sweep report (table and plots).

Command:  python -m llm_jax.train --config=experiments/sotu_small.py:adamw --workdir=/tmp/sotu_small_wd      # the base
          python -m llm_jax.sweep --sweep=experiments/sft_party_sweep.py --root=/tmp/sft_party
          python -m llm_jax.sweep --report --root=/tmp/sft_party
The two variants are sft_party.py's: `full` (every weight, learning rate 1e-3) and `lora` (rank 8 on
q,k,v,o,mlp_in,mlp_out, alpha 16, learning rate 5e-3); lora_targets is swept too only because a full fine-tune
must keep its default. Each run scores experiments/data/sotu_party/test_mc.jsonl at its last step
(zero_shot/test_mc/accuracy: summed label log-likelihood; accuracy_norm: per token), as
`python -m llm_jax.evaluate --zero_shot=...` does afterwards.
Result:   2026-12-01, --root=/tmp/sft_party, base /tmp/sotu_small_wd at step 400, on the 2-core CPU shared with
          two test suites and a training sweep (load average 6-11: the tokens/s and wall times, 6 min 38 s to
          19 min 04 s a run, measure the load). experiments/results/sft_party/ holds the report (results.md,
          runs.csv, plots); test accuracy on the 1,186 paragraphs, summed / per-token rule:
            full SFT, seeds 0 1 2: 0.6121 0.5582 0.5304 (0.5669 ± 0.0416) / 0.5885 0.5902 0.5894
            LoRA r=8, seeds 0 1 2: 0.5911 0.5911 0.5885 (0.5902 ± 0.0015) / 0.5911 ×3
          validation loss (completion tokens) 0.1591 ± 0.0132 (full) and 0.3678 ± 0.0044 (LoRA), 3,716,608 and
          147,456 trainable parameters. Every accuracy and validation loss equals, to the digits shown, the runs
          of experiments/sft_party.py made earlier the same day by a shell loop and scored afterwards with
          `llm_jax.evaluate --zero_shot`: the in-run scorer and the command agree, and the runs reproduce.
          The four-way figure (zero-shot, few-shot, full SFT, LoRA against chance and majority):
          python tools/sotu_party.py --plot=experiments/results/sotu_party/four_way.png \
            --results=experiments/results/sotu_party/zero_few_shot.jsonl \
            --sweep_runs=experiments/results/sft_party/runs.csv
"""

BASE = "experiments/sft_party.py"
SEEDS = (0, 1, 2)
ZIP = {"model.lora_rank": [0, 8],
       "model.lora_targets": ["q,v", "q,k,v,o,mlp_in,mlp_out"],
       "optim.learning_rate": [1e-3, 5e-3]}
OVERRIDES = {"eval_zero_shot_files": "experiments/data/sotu_party/test_mc.jsonl", "extra_eval_every": 150}
