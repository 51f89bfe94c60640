"""Loading a trained (or converted) model from a workdir: its model card, tokenizer and parameters."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax

from llm_jax import checkpoint as checkpoint_lib
from llm_jax import sampling
from llm_jax import sharding
from llm_jax.hf.tokenizer import HFTokenizer
from llm_jax.model import ModelConfig
from llm_jax.model import abstract_params
from llm_jax.tokenizer import Tokenizer
from llm_jax.tokenizer import file_sha256
from llm_jax.tokenizer import load_tokenizer

MODEL_FILE = "model.json"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  cfg: ModelConfig
  params: Any
  tokenizer: Tokenizer | HFTokenizer
  step: int


def write_model_card(workdir: str, cfg: ModelConfig, tokenizer_path: str) -> None:
  """What `generate` and `evaluate` need to rebuild the model without the experiment config."""
  card = {"model": dataclasses.asdict(cfg), "tokenizer": os.path.relpath(tokenizer_path, workdir)}
  with open(os.path.join(workdir, MODEL_FILE), "w", encoding="utf-8") as f:
    json.dump(card, f, indent=2)


def read_model_card(workdir: str) -> tuple[ModelConfig, str]:
  path = os.path.join(workdir, MODEL_FILE)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir} does not exist; pass the directory a training run wrote")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing; --workdir must be a directory written by llm_jax.train "
                            "or llm_jax.convert")
  with open(path, encoding="utf-8") as f:
    card = json.load(f)
  return ModelConfig(**card["model"]), os.path.join(workdir, card["tokenizer"])


def load_model(workdir: str, step: int | None = None) -> LoadedModel:
  """Parameters of checkpoint `step` (default: newest), replicated on this host's devices."""
  cfg, tokenizer_path = read_model_card(workdir)
  if not os.path.exists(tokenizer_path):
    raise FileNotFoundError(f"tokenizer {tokenizer_path} named in {MODEL_FILE} is missing")
  tokenizer = load_tokenizer(tokenizer_path)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} ids but the model only "
                     f"{cfg.vocab_size}; the tokenizer does not belong to this checkpoint")
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  params_abstract = nn.unbox(abstract_params(cfg))
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), params_abstract)
  ckpt = checkpoint_lib.Checkpointer(workdir, every=1, keep=1_000_000, async_save=False)
  try:
    restored_step, params = ckpt.restore_params(params_abstract, shardings, step)
    saved_sha = ckpt.restore_meta(restored_step).get("tokenizer_sha256")
  finally:
    ckpt.close()
  if saved_sha and saved_sha != file_sha256(tokenizer_path):
    raise ValueError(f"tokenizer {tokenizer_path} is not the one checkpoint {restored_step} was trained with "
                     "(sha256 differs); restore the workdir's original tokenizer file")
  return LoadedModel(cfg=cfg, params=params, tokenizer=tokenizer, step=restored_step)


def generate_texts(params: Any, cfg: ModelConfig, tok: Tokenizer | HFTokenizer, prompt: str, *, max_length: int,
                   num_return_sequences: int, temperature: float, top_k: int, top_p: float,
                   seed: int) -> list[str]:
  """Continuations of `prompt`, each decoded with the prompt in front (BOS counts towards max_length)."""
  prompt_ids = ([tok.bos_id] if tok.bos_id >= 0 else []) + tok.encode(prompt)
  rows = sampling.generate(params, cfg, prompt_ids, max_length=max_length,
                           num_return_sequences=num_return_sequences, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed, eos_id=tok.eos_id)
  skip = 1 if tok.bos_id >= 0 else 0
  return [tok.decode([int(t) for t in row[skip:] if int(t) != tok.eos_id]) for row in rows]
