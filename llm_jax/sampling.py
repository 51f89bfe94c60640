"""Text generation from a trained model: the sampling rule, the KV-cached, jit-compiled decode loop, and text in/out."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Collection
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import chat
from llm_jax import errors
from llm_jax.model import Transformer
from llm_jax.model import init_cache
from llm_jax.model_config import ModelConfig

Array = jax.Array


def _python_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.generic))


def sample_logits(logits_BxV: Array, rng: Array, *, temperature: float | Array, top_k: int,
                  top_p: float | Array) -> Array:
  """Draws one token per row: argmax at temperature 0, else temperature → top-k → top-p → categorical.

  `top_k` is a Python int (0 = off), since `lax.top_k` needs a static k. `temperature` and `top_p` may be
  Python numbers, which choose greedy decoding or skip the nucleus filter at trace time, or traced
  scalars (one compiled program for every setting; a traced temperature must be positive).
  """
  if _python_number(temperature) and temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  neg_inf = jnp.finfo(jnp.float32).min
  if 0 < top_k < logits_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, neg_inf)
  if not (_python_number(top_p) and top_p >= 1.0):
    logits_BxV = jnp.where(_nucleus_mask(logits_BxV, top_p), logits_BxV, neg_inf)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def _nucleus_mask(logits_BxV: Array, top_p: float | Array) -> Array:
  """True for the smallest most-likely set whose probability reaches top_p (never empty)."""
  order_BxV = jnp.argsort(-logits_BxV, axis=-1)
  probs_BxV = jax.nn.softmax(jnp.take_along_axis(logits_BxV, order_BxV, axis=-1), axis=-1)
  # Exclusive cumsum: a token stays while the mass strictly before it is below top_p, so the most
  # likely token always stays. At top_p >= 1 keep everything: rounding can push the sum past 1.
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  keep_sorted_BxV = (mass_before_BxV < top_p) | (top_p >= 1.0)
  return jnp.take_along_axis(keep_sorted_BxV, jnp.argsort(order_BxV, axis=-1), axis=-1)


# Positive temperatures below this decode greedily: dividing logits by less overflows float32 to inf and nan,
# which would sample garbage (often nothing but eos).
GREEDY_BELOW = 1e-6
# The largest KV cache sampling may allocate; a bigger one means a max_length or batch that was not meant.
MAX_CACHE_BYTES = 16 << 30


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """What to sample (the trainer's end-of-run samples, `generate`'s flags): the one table of their defaults."""

  prompt: str = "I love computer science"  # Text the samples continue.
  max_length: int = 50  # Counts the prompt, as in Hugging Face generate.
  num_return_sequences: int = 5  # Samples printed.
  temperature: float = 0.8  # Softmax temperature; 0 (or below GREEDY_BELOW) decodes greedily.
  top_k: int = 40  # Keep the k most likely tokens; 0 keeps all.
  top_p: float = 0.95  # Nucleus sampling mass; 1.0 keeps all.

  def check(self, given: Collection[str] = (), prefix: str = "--config.sample.") -> int:
    """Refuses settings that cannot work, or that greedy decoding would ignore (`given`: the names the user set),
    before any model is read; returns how many continuations to decode. `prefix` names the settings as the user
    spells them: '--config.sample.' (the trainer) or '--' (generate's flags)."""
    check_settings(max_length=self.max_length, num_return_sequences=self.num_return_sequences,
                   temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, prefix=prefix)
    check_prompt(self.prompt, prefix)
    return sequences_to_decode(temperature=self.temperature, num_return_sequences=self.num_return_sequences,
                               given=given, prefix=prefix)

  def given(self) -> tuple[str, ...]:
    """The settings away from their defaults, which greedy decoding refuses when it would ignore them."""
    return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default)


def check_settings(*, max_length: int, num_return_sequences: int, temperature: float, top_k: int, top_p: float,
                   prefix: str = "--") -> None:
  """Refuses sampling settings that cannot work; `prefix` names them as the user spells them.

  `prefix` is '--' for generate's flags and '--config.sample.' for the trainer's end-of-run samples.
  """
  if max_length < 2:
    raise errors.ConfigError(f"{prefix}max_length={max_length} leaves no room to generate; it counts the prompt, so "
                             f"raise {prefix}max_length above the prompt's length in tokens")
  if num_return_sequences < 1:
    raise errors.ConfigError(f"{prefix}num_return_sequences={num_return_sequences} must be at least 1")
  if not math.isfinite(temperature):
    raise errors.ConfigError(f"{prefix}temperature={temperature} is not a finite number; use 0 for greedy or a "
                             "positive value")
  if temperature < 0:
    raise errors.ConfigError(f"{prefix}temperature={temperature} is negative; use 0 for greedy or a positive value")
  if not 0 < top_p <= 1:  # also refuses nan
    raise errors.ConfigError(f"{prefix}top_p={top_p} is outside (0, 1]; use 1.0 to turn nucleus filtering off")
  if top_k < 0:
    raise errors.ConfigError(f"{prefix}top_k={top_k} is negative; use 0 to turn top-k filtering off")


def sequences_to_decode(*, temperature: float, num_return_sequences: int, given: Collection[str],
                        prefix: str = "--") -> int:
  """How many continuations a request decodes: greedy decoding (temperature below GREEDY_BELOW) has one, and reads
  neither top_k, top_p nor a seed, so those settings are refused when the user gave them (`given`: their names).

  Sampling keeps `num_return_sequences`; greedy without it decodes one (as Hugging Face generate, which refuses more).
  """
  if temperature >= GREEDY_BELOW:
    return num_return_sequences
  greedy = f"greedy decoding ({prefix}temperature={temperature:g})"
  for name in ("top_k", "top_p", "seed"):
    if name in given:
      raise errors.ConfigError(f"{prefix}{name} is set but {greedy} ignores it; drop it, or sample with a positive "
                               f"{prefix}temperature")
  if "num_return_sequences" in given and num_return_sequences > 1:
    raise errors.ConfigError(f"{prefix}num_return_sequences={num_return_sequences} would repeat the one continuation "
                             f"of {greedy}; drop it, or sample with a positive {prefix}temperature")
  return 1


def check_prompt(prompt: str, prefix: str = "--") -> None:
  """Refuses a prompt the tokenizer cannot encode (invalid UTF-8 arrives as surrogate escapes)."""
  try:
    prompt.encode("utf-8")
  except UnicodeEncodeError as e:
    raise errors.ConfigError(f"{prefix}prompt is not valid UTF-8 (byte {e.start}); pass UTF-8 text") from None


def check_fits(cfg: ModelConfig, max_length: int, num_return_sequences: int, prefix: str = "--") -> None:
  """Refuses a max_length past the model's learned positions (gpt2) or a KV cache over MAX_CACHE_BYTES."""
  if cfg.position_limit and max_length > cfg.position_limit:
    raise errors.ConfigError(f"{prefix}max_length={max_length} exceeds the {cfg.position_limit} learned positions of "
                             f"this {cfg.family} model; lower {prefix}max_length to at most {cfg.position_limit}")
  cache_bytes = (2 * cfg.num_layers * num_return_sequences * max_length * cfg.num_kv_heads * cfg.head_dim
                 * cfg.dtype.itemsize)
  if cache_bytes > MAX_CACHE_BYTES:
    raise errors.ConfigError(f"{prefix}max_length={max_length} x {prefix}num_return_sequences={num_return_sequences} "
                             f"needs a {cache_bytes / 2**30:.0f} GiB KV cache, over the {MAX_CACHE_BYTES >> 30} GiB "
                             "bound; lower them")


def check_request(cfg: ModelConfig, prompt_len: int, max_length: int, num_return_sequences: int,
                  temperature: float, top_k: int, top_p: float, prefix: str = "--") -> None:
  """Every check of a sampling request on model `cfg` with a prompt of `prompt_len` tokens; `prefix` as in
  `SampleConfig.check`."""
  if prompt_len == 0:
    raise errors.ConfigError("the prompt is empty; give at least one token (e.g. a BOS id) to condition on")
  check_settings(max_length=max_length, num_return_sequences=num_return_sequences, temperature=temperature,
                 top_k=top_k, top_p=top_p, prefix=prefix)
  limit = cfg.position_limit
  if limit and prompt_len >= limit:  # no max_length can help: the advice to raise it would loop
    raise errors.ConfigError(f"the prompt ({prompt_len} tokens, a chat's whole conversation) fills all {limit} "
                             "positions of this model; shorten it (in a chat, start a new conversation)")
  if max_length <= prompt_len:
    raise errors.ConfigError(f"{prefix}max_length={max_length} is not longer than the prompt ({prompt_len} tokens); "
                             f"raise {prefix}max_length"
                             + (f" (up to {limit}, this model's positions)" if limit else ""))
  check_fits(cfg, max_length, num_return_sequences, prefix)


def _check_ids(name: str, ids: np.ndarray, vocab_size: int) -> None:
  # Out-of-range ids would be silently read as NaN embeddings by `jnp.take`, so refuse them here.
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise errors.DataError(f"{name} has ids outside [0, {vocab_size}) (min {ids.min()}, max {ids.max()}); encode with "
                           "the tokenizer this model was trained with")


@functools.partial(jax.jit, static_argnames=("cfg", "num_sequences", "max_length", "greedy", "top_k"))
def _generate_jit(params: Any, prompt_P: Array, rng: Array, temperature: Array, top_p: Array,
                  eos_id: Array, *, cfg: ModelConfig, num_sequences: int, max_length: int,
                  greedy: bool, top_k: int) -> Array:
  """Prefill, then decode one token per step; eos_id < 0 means no eos.

  jax.jit keeps one program per (cfg, shapes, greedy, top_k); temperature, top_p, eos and the seed are
  traced, so changing them does not recompile.
  """
  model = Transformer(cfg)
  n, p, t = num_sequences, prompt_P.shape[0], max_length
  sample = functools.partial(sample_logits, temperature=0.0 if greedy else temperature, top_k=top_k,
                             top_p=top_p)
  fill = jnp.maximum(eos_id, 0)

  tokens_NxP = jnp.broadcast_to(prompt_P.astype(jnp.int32), (n, p))
  positions_NxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (n, p))
  logits_NxPxV, cache = model.apply({"params": params}, tokens_NxP, positions_NxP,
                                    cache=init_cache(cfg, n, t))
  # Keys are folded with the position whose logits they sample from: one fresh key per step.
  token_N = sample(logits_NxPxV[:, -1], jax.random.fold_in(rng, p - 1))
  # Pre-filling with eos means an early exit (every row finished) leaves a correctly padded buffer.
  out_NxT = jnp.full((n, t), fill, jnp.int32).at[:, :p].set(tokens_NxP).at[:, p].set(token_N)

  def cond(state: tuple) -> Array:
    i, _, done_N, _, _ = state
    return (i < t - 1) & ~jnp.all(done_N)

  def body(state: tuple) -> tuple:
    i, token_N, done_N, cache, out_NxT = state
    positions_Nx1 = jnp.full((n, 1), i, jnp.int32)
    logits_Nx1xV, cache = model.apply({"params": params}, token_N[:, None], positions_Nx1, cache=cache)
    next_N = jnp.where(done_N, fill, sample(logits_Nx1xV[:, 0], jax.random.fold_in(rng, i)))
    out_NxT = jax.lax.dynamic_update_slice_in_dim(out_NxT, next_N[:, None], i + 1, axis=1)
    return i + 1, next_N, done_N | (next_N == eos_id), cache, out_NxT

  state = (jnp.int32(p), token_N, token_N == eos_id, cache, out_NxT)
  return jax.lax.while_loop(cond, body, state)[-1]


def generate(params: Any, cfg: ModelConfig, prompt_tokens: Sequence[int], *, max_length: int,
             num_return_sequences: int = 1, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None) -> np.ndarray:
  """Continues `prompt_tokens` into `num_return_sequences x max_length` int32 ids, prompt included.

  `max_length` counts the prompt (as in Hugging Face `generate`). After a sequence emits `eos_id`, the
  rest of its row is `eos_id`; the loop ends once every row has. `eos_id` None or negative: no eos.
  Settings are validated up front with errors that name the flag to change. Temperatures below
  GREEDY_BELOW decode greedily.
  """
  prompt_P = np.asarray(prompt_tokens, dtype=np.int64).reshape(-1)
  check_request(cfg, prompt_P.shape[0], max_length, num_return_sequences, temperature, top_k, top_p)
  _check_ids("the prompt", prompt_P, cfg.vocab_size)
  greedy = bool(temperature < GREEDY_BELOW)
  # A negative id means "no eos", as sentencepiece reports a disabled piece (-1).
  if eos_id is not None and eos_id >= 0:
    _check_ids("--eos_id", np.asarray([eos_id]), cfg.vocab_size)
  out_NxT = _generate_jit(params, jnp.asarray(prompt_P, jnp.int32), jax.random.key(seed),
                          jnp.float32(temperature), jnp.float32(top_p),
                          jnp.int32(-1 if eos_id is None or eos_id < 0 else eos_id), cfg=cfg,
                          num_sequences=num_return_sequences, max_length=max_length,
                          greedy=greedy, top_k=0 if greedy else int(top_k))
  return np.asarray(out_NxT)


def prompt_ids(tok: Any, text: str) -> list[int]:
  """[bos] + the ids of `text`, as training saw documents and SFT rows (no second bos when the text holds one)."""
  ids = tok.encode(text)
  return ([tok.bos_id] if tok.bos_id >= 0 and not (ids and ids[0] == tok.bos_id) else []) + ids


def chat_replies(params: Any, cfg: ModelConfig, tok: Any, template: chat.ChatTemplate, messages: list[dict[str, str]],
                 *, max_length: int, num_return_sequences: int, temperature: float, top_k: int, top_p: float,
                 seed: int) -> list[str]:
  """The assistant's next turn after `messages`, rendered with `template`: each reply is cut where it reaches the
  end-of-turn marker (or eos), and `max_length` counts the rendered conversation."""
  ids = prompt_ids(tok, template.render(messages, add_generation_prompt=True))
  rows = generate(params, cfg, ids, max_length=max_length, num_return_sequences=num_return_sequences,
                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_id=tok.eos_id)
  texts = [tok.decode([int(t) for t in row[len(ids):] if int(t) != tok.eos_id]) for row in rows]
  return [text.split(template.end_of_turn)[0] if template.end_of_turn else text for text in texts]


def generate_texts(params: Any, cfg: ModelConfig, tok: Any, prompt: str, *, max_length: int,
                   num_return_sequences: int, temperature: float, top_k: int, top_p: float,
                   seed: int) -> list[str]:
  """Continuations of `prompt`, each decoded with the prompt in front (BOS counts towards max_length).

  `tok` is any tokenizer with encode, decode, bos_id and eos_id (sentencepiece or Hugging Face).
  """
  prompt_ids = ([tok.bos_id] if tok.bos_id >= 0 else []) + tok.encode(prompt)
  rows = generate(params, cfg, prompt_ids, max_length=max_length,
                  num_return_sequences=num_return_sequences, temperature=temperature,
                  top_k=top_k, top_p=top_p, seed=seed, eos_id=tok.eos_id)
  skip = 1 if tok.bos_id >= 0 else 0
  return [tok.decode([int(t) for t in row[skip:] if int(t) != tok.eos_id]) for row in rows]
