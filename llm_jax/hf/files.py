"""Hugging Face checkpoint directories in and out of llm_jax workdirs: safetensors, config.json, tokenizer files.

A converted workdir holds the model a trained one does: a params-only checkpoint at step 0 (float32), `model.json`
and the tokenizer (`tokenizer.json` + `tokenizer_config.json`, or a sentencepiece `tokenizer.model`), so `generate`,
`evaluate --text_files` and `train --config.init_params_from=DIR` all accept it. It has no training run, so no
llm_jax `config.json`.
Nothing here needs torch, transformers or the internet.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from typing import Any
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from llm_jax import checkpoint as checkpoint_lib
from llm_jax import errors
from llm_jax import paths
from llm_jax import workdir as workdir_lib
from llm_jax.hf import tokenizer as hf_tokenizer
from llm_jax.hf import weights
from llm_jax.model import abstract_params
from llm_jax.model_config import ModelConfig
from llm_jax.model_config import check_vocab_fits
from llm_jax.tokenizer import load_tokenizer

HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  if not os.path.isdir(hf_dir):
    raise errors.MissingFileError(f"--from_hf={hf_dir} is not a directory; pass a local Hugging Face checkpoint "
                                  "directory")
  path = os.path.join(hf_dir, HF_CONFIG_FILE)
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"{path} is missing; a Hugging Face checkpoint directory has config.json")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.DataError(f"{path} is not valid JSON ({str(e).splitlines()[0][:120]}); restore the "
                           "checkpoint's config.json") from None
  if not isinstance(config, dict):
    raise errors.DataError(f"{path} holds a JSON {type(config).__name__}, not the model's settings; restore the "
                           "checkpoint's config.json")
  return config


def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of every *.safetensors file in `hf_dir`, as float32 numpy (bfloat16 included)."""
  weight_files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if not weight_files:
    raise errors.MissingFileError(f"{hf_dir} has no *.safetensors weights (pytorch_model.bin is not read: re-save "
                                  "with save_pretrained(..., safe_serialization=True))")
  tensors = {}
  # The flax reader understands bfloat16, which numpy does not; read on the host, then free each copy.
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    for path in weight_files:
      try:
        with safetensors.safe_open(path, framework="flax") as f:
          for name in f.keys():
            tensors[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
      except (safetensors.SafetensorError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:160]
        raise errors.DataError(f"{path} is not a readable safetensors file ({reason}); download or save it "
                               "again") from None
  return tensors


def _resolve_specials(specials: dict[str, Any], hf: dict[str, Any], id_to_token: Any) -> dict[str, Any]:
  """Names bos/eos in the tokenizer config when only config.json's *_token_id says which they are."""
  specials = dict(specials)
  for key in ("eos_token", "bos_token"):
    token_id = hf.get(f"{key}_id")
    token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
    if not hf_tokenizer.token_content(specials.get(key)) and isinstance(token_id, int):
      token = id_to_token(token_id)
      if token is not None:
        specials[key] = token
  return specials


def import_tokenizer(hf_dir: str, workdir: str, hf: dict[str, Any]) -> str:
  """Copies (or, from vocab.json + merges.txt, builds) the tokenizer into `workdir`; returns its path."""
  source = os.path.join(hf_dir, TOKENIZER_JSON)
  vocab, merges = os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt")
  specials = hf_tokenizer.special_tokens(hf_dir)
  target = os.path.join(workdir, TOKENIZER_JSON)
  if os.path.isfile(source):
    tokenizer = hf_tokenizer.read_tokenizer_json(source)
    shutil.copyfile(source, target)
  elif os.path.isfile(vocab) and os.path.isfile(merges):
    eos = hf_tokenizer.token_content(specials.get("eos_token")) or hf_tokenizer.USUAL_EOS_TOKENS[0]
    tokenizer = hf_tokenizer.byte_level_bpe(vocab, merges, eos)
    tokenizer.save(target)
  elif os.path.isfile(os.path.join(hf_dir, SENTENCEPIECE_MODEL)):
    target = os.path.join(workdir, SENTENCEPIECE_MODEL)
    shutil.copyfile(os.path.join(hf_dir, SENTENCEPIECE_MODEL), target)
    return target
  else:
    raise errors.MissingFileError(f"{hf_dir} has no tokenizer: expected tokenizer.json, vocab.json + merges.txt, or "
                                  "tokenizer.model")
  specials = _resolve_specials(specials, hf, tokenizer.id_to_token)
  with open(os.path.join(workdir, hf_tokenizer.CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(specials, f, indent=2, ensure_ascii=False)
  return target


def _check_empty(workdir: str) -> None:
  directory = workdir_lib.checkpoint_dir(workdir)
  if os.path.isdir(directory) and os.listdir(directory):
    raise errors.ConfigError(f"--workdir={workdir} already holds checkpoints; convert into a new or empty directory")


def import_hf(hf_dir: str, workdir: str) -> tuple[ModelConfig, int]:
  """Converts a Hugging Face GPT-2 or Llama checkpoint directory into an llm_jax workdir.

  Returns (model config, parameter count). Config and tokenizer are checked before the weights are read.
  """
  paths.check_local(hf_dir, "--from_hf")
  paths.check_local(workdir, "--workdir")
  _check_directory(workdir, "--workdir")
  hf = read_hf_config(hf_dir)
  cfg = weights.model_config_from_hf(hf)
  _check_empty(workdir)
  # Everything is built beside the target and moved into place at the end: a conversion that fails (a
  # truncated safetensors file, say) leaves no half-built workdir behind.
  with _staging(workdir) as staging:
    tokenizer_path = import_tokenizer(hf_dir, staging, hf)
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocab_fits(cfg.vocab_size, tokenizer.vocab_size,
                     f"config.json vocab_size is {cfg.vocab_size}: the tokenizer in {hf_dir} does not belong to it")
    params = weights.params_from_hf(read_safetensors(hf_dir), cfg, nn.unbox(abstract_params(cfg)))
    params = jax.tree.map(jnp.asarray, params)
    meta = workdir_lib.checkpoint_meta(cfg, tokenizer_path, converted_from=os.path.abspath(hf_dir))
    ckpt = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(staging), keep=1, async_save=False)
    try:
      ckpt.save_params(0, params, meta)
    finally:
      ckpt.close()
    workdir_lib.write_model_card(staging, cfg, tokenizer_path)
  return cfg, sum(int(x.size) for x in jax.tree.leaves(params))


def _check_directory(location: str, flag: str) -> None:
  if os.path.exists(location) and not os.path.isdir(location):
    raise errors.ConfigError(f"{flag}={location} is a file, not a directory; pass a new or empty directory")


@contextlib.contextmanager
def _staging(target: str) -> Iterator[str]:
  """A temporary directory beside `target` whose entries replace target's on success; removed on failure."""
  parent = os.path.dirname(os.path.abspath(target))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(target))}.partial-", dir=parent)
  try:
    yield staging
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(staging):
      destination = os.path.join(target, name)
      if os.path.isdir(destination):
        shutil.rmtree(destination)  # only ever an empty checkpoints/ (checked before) or a stale copy of ours
      os.replace(os.path.join(staging, name), destination)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _export_tokenizer(tokenizer: Any, hf_dir: str) -> None:
  """Copies the tokenizer file and writes a tokenizer_config.json naming its special tokens."""
  path = tokenizer.path
  config = hf_tokenizer.read_json(os.path.join(os.path.dirname(path), hf_tokenizer.CONFIG_FILE))
  if path.endswith(".json"):
    shutil.copyfile(path, os.path.join(hf_dir, TOKENIZER_JSON))
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
  else:
    shutil.copyfile(path, os.path.join(hf_dir, SENTENCEPIECE_MODEL))
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "unk_token": tokenizer.id_to_piece(tokenizer.unk_id),
              "pad_token": tokenizer.id_to_piece(tokenizer.pad_id)}
  for key, token_id in (("eos_token", tokenizer.eos_id), ("bos_token", tokenizer.bos_id)):
    if token_id >= 0 and not hf_tokenizer.token_content(config.get(key)):
      config[key] = tokenizer.id_to_piece(token_id)
  with open(os.path.join(hf_dir, hf_tokenizer.CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)


def export_hf(workdir: str, hf_dir: str, step: int | None = None) -> tuple[ModelConfig, int]:
  """Writes checkpoint `step` (default newest) of `workdir` as a Hugging Face directory; returns (config, step)."""
  paths.check_local(hf_dir, "--to_hf")
  _check_directory(hf_dir, "--to_hf")
  if os.path.isfile(os.path.join(hf_dir, HF_CONFIG_FILE)):
    raise errors.ConfigError(f"--to_hf={hf_dir} already holds a model (config.json); pass a new or empty directory")
  loaded = workdir_lib.load_model(workdir, step)
  cfg, tokenizer = loaded.cfg, loaded.tokenizer
  hf_config = weights.hf_config_from_model(cfg, tokenizer.bos_id, tokenizer.eos_id)
  tensors = weights.params_to_hf(jax.device_get(loaded.params), cfg)
  with _staging(hf_dir) as staging:
    safetensors.numpy.save_file(tensors, os.path.join(staging, HF_WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(staging, HF_CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(hf_config, f, indent=2)
    _export_tokenizer(tokenizer, staging)
    _readable_by_all(staging)
  return cfg, loaded.step


def _readable_by_all(directory: str) -> None:
  """Exported files get the usual 0644 (less the umask): safetensors writes its file 0600, which other users and
  the serving process of a shared model directory then cannot read."""
  umask = os.umask(0)
  os.umask(umask)
  for name in os.listdir(directory):
    os.chmod(os.path.join(directory, name), 0o666 & ~umask)
