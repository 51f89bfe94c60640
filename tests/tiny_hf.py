"""Test fixtures built on the spot, never downloaded: tiny Hugging Face tokenizers and GPT-2 / Llama checkpoints."""

import json
import os
from pydoc_data.topics import topics
from typing import Any

import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import processors
from tokenizers import trainers

TEXTS = list(topics.values())[:200]
BPE_VOCAB = 384
LLAMA_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def byte_level_bpe(specials: list[str], prepend: str | None) -> tokenizers.Tokenizer:
  """A GPT-2-style byte-level BPE of BPE_VOCAB ids; `prepend` is a special token the post-processor adds."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS, trainer)
  if prepend:
    tok.post_processor = processors.TemplateProcessing(single=f"{prepend} $A",
                                                       special_tokens=[(prepend, tok.token_to_id(prepend))])
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return tok


def char_tokenizer(directory: str, text: str) -> str:
  """A character-level tokenizer.json (one id per character of `text`) with <s> prepended; returns its path."""
  specials = ["<unk>", "<s>", "</s>"]
  vocab = {t: i for i, t in enumerate(specials + sorted(set(text)))}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  tok.add_special_tokens(specials)
  tok.decoder = decoders.Fuse()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "tokenizer.json")
  tok.save(path)
  write_json(os.path.join(directory, "tokenizer_config.json"), LLAMA_SPECIALS)
  return path


def write_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f)


def gpt2_dir(directory: str) -> Any:
  """A random 2-layer GPT-2 saved with vocab.json + merges.txt (no tokenizer_config.json); returns the model."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  tok = byte_level_bpe(["<|endoftext|>"], None)
  os.makedirs(directory, exist_ok=True)
  tok.model.save(directory)
  eos = tok.token_to_id("<|endoftext|>")
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                   bos_token_id=eos, eos_token_id=eos, initializer_range=0.1)
  model = transformers.GPT2LMHeadModel(config).eval()
  model.save_pretrained(directory)
  return model


def llama_dir(directory: str, **overrides: Any) -> Any:
  """A random 2-layer Llama with grouped-query attention, head_dim != width / heads and Llama-3 RoPE scaling."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  tok = byte_level_bpe(list(LLAMA_SPECIALS.values()), "<s>")
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  write_json(os.path.join(directory, "tokenizer_config.json"), LLAMA_SPECIALS)
  torch.manual_seed(1)
  settings = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                  rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.1,
                  bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"),
                  rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
  settings.update(overrides)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()
  model.save_pretrained(directory)
  return model
