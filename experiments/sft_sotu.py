"""Supervised fine-tuning of README's sotu_small model on the shipped SFT example set, fully or with LoRA adapters.

Data:     experiments/data/sotu_sft.jsonl, 458 rows made offline by `python experiments/make_sotu_sft.py` (the same
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
Hardware: 2-core x86-64 CPU, float32, one device.
Results:  see RESULTS below (measured 2026-12-01 while other jobs shared the cores).
"""

from llm_jax import config as config_lib

VARIANTS = ("full", "lora")
RESULTS = """
(filled in from the runs: validation completion loss of the base and after fine-tuning, wall time)
"""


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
  c.optim.learning_rate = 1e-3  # a third of pre-training's peak: fine-tuning moves the weights gently
  c.log_every = 10
  c.eval_every = 50
  c.eval_batches = 4
  c.eval_batch_size = 16
  c.checkpoint_every = 50
  c.model.remat_policy = "dots"  # as the base (RUNTIME_FIELDS are the run's own)
  c.sample.num_return_sequences = 2
  if variant == "lora":
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    c.model.lora_targets = "q,k,v,o,mlp_in,mlp_out"
    c.optim.learning_rate = 5e-3  # adapters start at zero and take larger steps
  elif variant != "full":
    raise ValueError(f"unknown variant {variant!r} of experiments/sft_sotu.py; use full or lora")
  return c
