"""Fine-tuning README's sotu_small model on the shipped party task (experiments/sotu_party.py), fully or with LoRA:
rows (c) and (d) of the task's four-way table.

Data:     experiments/data/sotu_party/train.jsonl (3,142 {"prompt", "completion"} rows from 143 speeches; only the
          label " Democratic" / " Republican" and eos count in the loss), 5% of rows held out by hash for the
          validation loss; accuracy is measured afterwards on test_mc.jsonl (1,186 paragraphs of 47 other speeches).
Commands: python -m llm_jax.train --config=experiments/sotu_small.py --workdir=/tmp/sotu_small_wd      # the base
          for v in full lora; do for s in 0 1 2; do
            python -m llm_jax.train --config=experiments/sft_party.py:$v --workdir=/tmp/party_${v}_$s --config.seed=$s
            python -m llm_jax.evaluate --workdir=/tmp/party_${v}_$s \\
              --zero_shot=experiments/data/sotu_party/test_mc.jsonl
          done; done
Results:  not run yet (2026-12-01: no machine time was left after the merges); rows (a) and (b), zero- and
          few-shot, are in experiments/sotu_party.py's docstring.
"""

from llm_jax import config as config_lib

VARIANTS = ("full", "lora")


def get_config(variant: str = "full"):
  c = config_lib.get_config()
  c.init_params_from = "/tmp/sotu_small_wd"  # the model, tokenizer and dimensions come from here
  c.data.corpus = "sft"
  c.data.sft_files = "experiments/data/sotu_party/train.jsonl"
  c.data.seq_len = 128  # the base's learned positions
  c.num_train_steps = 150
  c.global_batch_size = 16
  c.optim.warmup_steps = 15
  c.optim.learning_rate = 1e-3
  c.log_every = 25
  c.eval_every = 75
  c.eval_batches = 4
  c.eval_batch_size = 16
  c.checkpoint_every = 150
  c.model.remat_policy = "dots"
  c.sample.num_return_sequences = 1
  if variant == "lora":
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    c.model.lora_targets = "q,k,v,o,mlp_in,mlp_out"
    c.optim.learning_rate = 5e-3
  elif variant != "full":
    raise ValueError(f"unknown variant {variant!r} of experiments/sft_party.py; use full or lora")
  return c
