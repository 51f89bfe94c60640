"""The party task's fine-tuned rows as one sweep: full SFT and LoRA (experiments/sft_party.py), three seeds each,
with the test accuracy scored in the run and carried into the sweep report (table and plots).

Command:  python -m llm_jax.train --config=experiments/sotu_small.py --workdir=/tmp/sotu_small_wd      # the base
          python -m llm_jax.sweep --sweep=experiments/sft_party_sweep.py --root=/tmp/sft_party
          python -m llm_jax.sweep --report --root=/tmp/sft_party
The two variants are sft_party.py's: `full` (every weight, learning rate 1e-3) and `lora` (rank 8 on
q,k,v,o,mlp_in,mlp_out, alpha 16, learning rate 5e-3); lora_targets is swept too only because a full fine-tune
must keep its default. Each run scores experiments/data/sotu_party/test_mc.jsonl at its last step
(zero_shot/test_mc/accuracy: summed label log-likelihood; accuracy_norm: per token), as
`python -m llm_jax.evaluate --zero_shot=...` does afterwards.
Result:   (filled in from the run below)
"""

BASE = "experiments/sft_party.py"
SEEDS = (0, 1, 2)
ZIP = {"model.lora_rank": [0, 8],
       "model.lora_targets": ["q,v", "q,k,v,o,mlp_in,mlp_out"],
       "optim.learning_rate": [1e-3, 5e-3]}
OVERRIDES = {"eval_zero_shot_files": "experiments/data/sotu_party/test_mc.jsonl", "extra_eval_every": 150}
