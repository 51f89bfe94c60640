"""Hugging Face `tokenizer.json` tokenizers (GPT-2 byte-level BPE, Llama 3, ...) behind llm_jax's tokenizer interface.

Special ids come from the files, never from the model family:
- `bos_id` is the token the tokenizer's own post-processor puts in front of a text (Llama's `<s>` or
  `<|begin_of_text|>`), or -1 when it puts none (GPT-2): generation and packing then prepend nothing.
- `eos_id` is `eos_token` of `tokenizer_config.json` (or `special_tokens_map.json`) beside the file, else the
  first of the usual end-of-text tokens the vocabulary has.
"""

from __future__ import annotations

import json
import os
from typing import Any
from typing import Sequence

import tokenizers

from llm_jax import errors
from llm_jax import paths

CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# Tried in order when no config file names the end-of-text token.
USUAL_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
# The id `pad_id` reports when the tokenizer has no pad token (packing pads with 0 and masks it out).
DEFAULT_PAD_ID = 0


def read_json(path: str) -> dict[str, Any]:
  """The JSON object in `path`, or {} when the file does not exist."""
  if not paths.as_path(path).is_file():
    return {}
  return json.loads(paths.as_path(path).read_text(encoding="utf-8"))


def token_content(token: Any) -> str | None:
  """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
  if isinstance(token, dict):
    return token.get("content")
  return token if isinstance(token, str) else None


def special_tokens(directory: str) -> dict[str, Any]:
  """special_tokens_map.json overridden by tokenizer_config.json, both optional."""
  return {**read_json(os.path.join(directory, SPECIAL_TOKENS_FILE)),
          **read_json(os.path.join(directory, CONFIG_FILE))}


def read_tokenizer_json(path: str) -> tokenizers.Tokenizer:
  """The `tokenizers.Tokenizer` in `path`; a one-line ValueError when it is missing or not one."""
  if not paths.as_path(path).is_file():
    raise errors.DataError(f"tokenizer file {path!r} does not exist; pass an existing tokenizer.json or .model file")
  try:
    return tokenizers.Tokenizer.from_str(paths.as_path(path).read_text(encoding="utf-8"))
  except Exception as e:  # pylint: disable=broad-except  # the library raises bare Exceptions on bad files
    raise errors.DataError(f"{path} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:200]})") from None


class HFTokenizer:
  """A loaded `tokenizers.Tokenizer`; `path` is the tokenizer.json it came from."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, path: str, specials: dict[str, Any]):
    self._tokenizer = tokenizer
    self.path = path
    self.bos_id = self._prepended_id()
    self.eos_id = self._special_id(specials.get("eos_token"))
    if self.eos_id < 0:
      self.eos_id = next((i for i in map(tokenizer.token_to_id, USUAL_EOS_TOKENS) if i is not None), -1)
    if self.eos_id < 0:
      raise errors.DataError(f"tokenizer {path} has no end-of-text token: name it as eos_token in "
                             f"{os.path.join(os.path.dirname(path), CONFIG_FILE)}")
    self.unk_id = self._special_id(specials.get("unk_token"))
    pad_id = self._special_id(specials.get("pad_token"))
    self.pad_id = pad_id if pad_id >= 0 else DEFAULT_PAD_ID

  @classmethod
  def load(cls, path: str) -> HFTokenizer:
    """Loads a tokenizer.json and the special tokens named beside it."""
    return cls(read_tokenizer_json(path), path, special_tokens(os.path.dirname(path)))

  def _special_id(self, token: Any) -> int:
    content = token_content(token)
    token_id = self._tokenizer.token_to_id(content) if content else None
    return -1 if token_id is None else token_id

  def _prepended_id(self) -> int:
    """The one token the post-processor adds before a text, or -1 (it adds none, or adds it elsewhere)."""
    plain = self._tokenizer.encode("a", add_special_tokens=False).ids
    full = self._tokenizer.encode("a", add_special_tokens=True).ids
    if len(full) > len(plain) and full[1:1 + len(plain)] == plain:
      return full[0]
    return -1

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Returns the ids of `text`, without bos/eos."""
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str], threads: int = 0) -> list[list[int]]:
    """Returns the ids of each text; the library encodes on its own thread pool (sized by RAYON_NUM_THREADS), so
    `threads`, part of the shared tokenizer interface, does not apply here."""
    del threads
    return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    """Returns the text of `ids`; special tokens (bos, eos, pad) decode to nothing."""
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_piece(self, token_id: int) -> str:
    return self._tokenizer.id_to_token(int(token_id))

  def token_to_id(self, token: str) -> int | None:
    return self._tokenizer.token_to_id(token)


def byte_level_bpe(vocab_path: str, merges_path: str, eos_token: str) -> tokenizers.Tokenizer:
  """GPT-2's tokenizer rebuilt from vocab.json + merges.txt: byte-level BPE, nothing prepended or appended."""
  model = tokenizers.models.BPE.from_file(vocab_path, merges_path)
  tokenizer = tokenizers.Tokenizer(model)
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  tokenizer.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
  if tokenizer.token_to_id(eos_token) is not None:
    tokenizer.add_special_tokens([tokenizers.AddedToken(eos_token, special=True)])
  return tokenizer
