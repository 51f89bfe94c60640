"""Supervised fine-tuning of README's sotu_small model on the shipped SFT example set, fully or with LoRA adapters.

Data:     experiments/data/sotu_sft.jsonl, 458 rows made offline by `python tools/make_sotu_sft.py` (the same
          bytes on rerun): per speech, a chat row (paragraph + "Which president gave this State of the Union address?" →
          the president's full name) and a prompt/completion row (paragraph + "Year:" → " 1790"). Only the answers
          (and the chat template's end-of-turn marker, or eos) count in the loss.
Commands: python -m llm_jax.train --config=experiments/sotu_small.py --workdir=workdirs/sotu_small   # the base
          python -m llm_jax.train --config=experiments/sft_sotu.py --workdir=workdirs/sft_sotu
          python -m llm_jax.train --config=experiments/sft_sotu.py:lora --workdir=workdirs/sft_sotu_lora
          python -m llm_jax.generate --workdir=workdirs/sft_sotu --chat --temperature=0 --max_length=128 \\
            --prompt "We must act now to protect our economy.

          Which president gave this State of the Union address?"
          (--config.init_params_from=DIR names another base; the default is the first command's workdir.)
Hardware: 2-core x86-64 CPU, float32, one device, shared with other jobs (load average about 14).
Results:  the full recipe above was not run here: under that load sotu_small's base trained at 12 s/step (ETA 77 min)
          and was stopped. Checked instead at smoke scale (2026-12-01), each command with --config.num_train_steps=60
          --config.eval_every=30 --config.checkpoint_every=30, on a base trained by `python -m llm_jax.train
          --config=experiments/smoke.py --workdir=workdirs/smoke128 --config.data.seq_len=128
          --config.tokenizer.vocab_size=2048 --config.num_train_steps=60` (239,360 parameters) and
          --config.init_params_from=workdirs/smoke128: 416 train / 42 validation rows (371 packed train rows).
          Validation completion loss (answers and end-of-turn only, 410 tokens): base 7.8698; full SFT 5.7564 at
          step 30, 5.0902 at step 60 (86 s wall); LoRA (18,432 adapter parameters) 7.1185 and 6.8929 (74 s wall).
          A model this small and this briefly trained answers --chat with blank lines; the numbers show the masked
          loss moving, not a useful assistant.
"""

from llm_jax import config as config_lib

VARIANTS = ("full", "lora")


def get_config(variant: str = "full"):
  c = config_lib.get_config()
  c.init_params_from = "workdirs/sotu_small"  # the model, tokenizer and dimensions come from here
  c.data.corpus = "sft"
  c.data.sft_files = "experiments/data/sotu_sft.jsonl"
  c.data.seq_len = 128  # the base's learned positions; the longest row is 126 tokens
  c.data.validation_fraction = 0.1  # about 46 rows held out, by a hash of the row
  c.num_train_steps = 100
  c.global_batch_size = 16
  c.optim.warmup_steps = 10
  c.optim.name = "adamw"  # fine-tuning: the ablation that made Muon the default measured pre-training only
  c.optim.learning_rate = 1e-3  # a third of pre-training's peak: fine-tuning moves the weights gently
  c.log_every = 10
  c.eval_every = 50
  c.eval_batches = 4
  c.eval_batch_size = 16
  c.checkpoint_every = 50
  c.sample.num_return_sequences = 2
  if variant == "lora":
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    c.model.lora_targets = "q,k,v,o,mlp_in,mlp_out"
    c.optim.learning_rate = 5e-3  # adapters start at zero and take larger steps
  elif variant != "full":
    raise ValueError(f"unknown variant {variant!r} of experiments/sft_sotu.py; use full or lora")
  return c
