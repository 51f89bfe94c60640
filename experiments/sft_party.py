"""Fine-tuning README's sotu_small model on the shipped party task (tools/sotu_party.py), fully or with LoRA:
rows (c) and (d) of the task's four-way table.

Data:     experiments/data/sotu_party/train.jsonl (3,142 {"prompt", "completion"} rows from 143 speeches; only the
          label " Democratic" / " Republican" and eos count in the loss), 5% of rows held out by hash for the
          validation loss; accuracy is measured afterwards on test_mc.jsonl (1,186 paragraphs of 47 other speeches).
Commands: python -m llm_jax.train --config=experiments/sotu_small.py:adamw --workdir=/tmp/sotu_small_wd      # the base
          python -m llm_jax.sweep --sweep=experiments/sft_party_sweep.py --root=/tmp/sft_party   # both, 3 seeds,
          #   scored in the run and reported with plots (experiments/sft_party_sweep.py); or, one run at a time:
          for v in full lora; do for s in 0 1 2; do
            python -m llm_jax.train --config=experiments/sft_party.py:$v --workdir=/tmp/party_${v}_$s --config.seed=$s
            python -m llm_jax.evaluate --workdir=/tmp/party_${v}_$s \\
              --zero_shot=experiments/data/sotu_party/test_mc.jsonl
          done; done
Results (2026-12-01, quiet 2-core CPU, base /tmp/sotu_small_wd at step 400; 2,994 train / 148 validation rows,
          1,675 packed rows, 150 steps of 16; accuracy on the 1,186 test paragraphs by summed / per-token label
          log-likelihood; train + evaluate wall time per run):
            full SFT, seeds 0 1 2: 0.6121 0.5582 0.5304 (mean 0.5669) / 0.5885 0.5902 0.5894; val loss 0.174 0.154
                                   0.150; 1 min 38-41 s + 23-25 s
            LoRA r=8, seeds 0 1 2: 0.5911 0.5911 0.5885 (mean 0.5902) / 0.5911 ×3; val loss 0.373 0.366 0.364;
                                   1 min 59 s-2 min 9 s + 26-27 s
          Against chance 0.500 and majority 0.591 (rows (a) and (b) in tools/sotu_party.py): neither way of
          fine-tuning beats the majority label. LoRA learns the label prior and answers " Democratic" nearly always;
          full SFT moves off it on some paragraphs, one seed above the majority (0.612), two below, a spread as
          wide as the effect. At 3.7M parameters and 0.8M pre-training tokens the paragraphs carry no party signal
          the model can use; the task needs a larger pre-trained model (e.g. a converted GPT-2).
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
  c.optim.name = "adamw"  # fine-tuning: the ablation that made Muon the default measured pre-training only
  c.optim.learning_rate = 1e-3
  c.log_every = 25
  c.eval_every = 75
  c.eval_batches = 4
  c.eval_batch_size = 16
  c.checkpoint_every = 150
  c.sample.num_return_sequences = 1
  if variant == "lora":
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    c.model.lora_targets = "q,k,v,o,mlp_in,mlp_out"
    c.optim.learning_rate = 5e-3
  elif variant != "full":
    raise ValueError(f"unknown variant {variant!r} of experiments/sft_party.py; use full or lora")
  return c
