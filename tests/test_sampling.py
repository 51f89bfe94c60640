"""Tests for llm_jax.sampling: cached decoding against a no-cache reference, the sampling rule, eos, errors."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import raises_one_line

from llm_jax import errors
from llm_jax import sampling
from llm_jax.model import Transformer
from llm_jax.model import abstract_params
from llm_jax.model_config import ModelConfig
from llm_jax.sampling import generate
from llm_jax.sampling import sample_logits

PROMPT = [5, 17, 42]
# gpt2 runs up to its 16 learned positions; llama (RoPE) is allowed past its training length.
MAX_LENGTH = {"gpt2": 16, "llama": 20}
SAMPLED = 8  # rows in the sampling tests; they share one compiled program


def tiny_config(family: str, scan_layers: bool = True) -> ModelConfig:
  # Untied head: with a tied head a random tiny model greedily repeats its last input token, which
  # would make the greedy comparisons vacuous.
  return ModelConfig(family=family, vocab_size=97, num_layers=2, d_model=64, num_heads=4,
                     num_kv_heads=2 if family == "llama" else 4, head_dim=16, d_ff=128, max_len=16,
                     tie_embeddings=False, scan_layers=scan_layers)


@functools.cache
def tiny_params(cfg: ModelConfig):
  """Random params in the model's tree, built in numpy (no init to compile).

  Weights are 4x sharper than the 0.02 init, so greedy choices are separated by far more than float
  error (top-2 logit gaps of about 1e-2 against cache/no-cache differences of about 1e-6).
  """
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    noise = rng.normal(0.0, 0.08, leaf.shape).astype(np.float32)
    return jnp.asarray(noise + 1.0 if path[-1].key == "scale" else noise)

  return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract_params(cfg)))


def greedy_without_cache(params, cfg: ModelConfig, prompt, max_length: int) -> np.ndarray:
  """Reruns the whole model on the growing sequence each step (padding right; causality hides it)."""
  model = Transformer(cfg)
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
  tokens_T = np.zeros(max_length, np.int32)
  tokens_T[:len(prompt)] = prompt
  for t in range(len(prompt), max_length):
    logits_TxV = np.asarray(forward(params, jnp.asarray(tokens_T[None]))[0])
    tokens_T[t] = int(np.argmax(logits_TxV[t - 1]))
  return tokens_T


def llama_greedy(**settings) -> np.ndarray:
  cfg = tiny_config("llama")
  return generate(tiny_params(cfg), cfg, PROMPT, max_length=MAX_LENGTH["llama"],
                  num_return_sequences=2, temperature=0.0, **settings)


def llama_sampled(**settings) -> np.ndarray:
  cfg = tiny_config("llama")
  return generate(tiny_params(cfg), cfg, PROMPT, max_length=MAX_LENGTH["llama"],
                  num_return_sequences=SAMPLED, **{"temperature": 1.0, **settings})


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_greedy_matches_uncached_reference(family, scan_layers):
  cfg = tiny_config(family, scan_layers)
  params = tiny_params(cfg)
  max_length = MAX_LENGTH[family]
  expected_T = greedy_without_cache(params, cfg, PROMPT, max_length)
  got_NxT = generate(params, cfg, PROMPT, max_length=max_length, num_return_sequences=2,
                     temperature=0.0)
  assert got_NxT.shape == (2, max_length) and got_NxT.dtype == np.int32
  assert len(set(expected_T[len(PROMPT):].tolist())) > 3, "reference output is degenerate"
  np.testing.assert_array_equal(got_NxT, np.stack([expected_T, expected_T]))


def test_top_k_1_and_tiny_top_p_equal_greedy():
  greedy_NxT = np.tile(llama_greedy()[0], (SAMPLED, 1))
  np.testing.assert_array_equal(llama_sampled(top_k=1, seed=7), greedy_NxT)
  np.testing.assert_array_equal(llama_sampled(top_p=1e-6, seed=7), greedy_NxT)
  assert not np.array_equal(llama_sampled(seed=7), greedy_NxT), "plain sampling should differ"


def test_temperatures_too_small_to_divide_by_decode_greedily():
  # 1e-40 used to overflow the logits to inf/nan and sample garbage (often an empty text).
  cfg = tiny_config("gpt2")
  params = tiny_params(cfg)
  run = functools.partial(generate, params, cfg, PROMPT, max_length=MAX_LENGTH["gpt2"], top_k=5, top_p=0.9)
  greedy = run(temperature=0.0)
  assert len(set(greedy[0, len(PROMPT):].tolist())) > 3, "reference output is degenerate"
  np.testing.assert_array_equal(run(temperature=1e-40), greedy)


def test_fixed_seed_is_deterministic_and_seeds_differ():
  a, b, c = llama_sampled(seed=1), llama_sampled(seed=1), llama_sampled(seed=2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert len({tuple(row) for row in a}) > 1, "rows of one call should be independent draws"
  np.testing.assert_array_equal(a[:, :len(PROMPT)], np.tile(PROMPT, (SAMPLED, 1)))


def test_each_step_draws_fresh_randomness():
  # All-zero params give uniform logits, so a key reused across steps would repeat one token per row.
  cfg = tiny_config("llama")
  zeros = jax.tree.map(jnp.zeros_like, tiny_params(cfg))
  out = generate(zeros, cfg, PROMPT, max_length=MAX_LENGTH["llama"], num_return_sequences=SAMPLED,
                 temperature=1.0, seed=3)
  distinct_per_row = [len(set(row[len(PROMPT):].tolist())) for row in out]
  assert min(distinct_per_row) > 8, distinct_per_row


def chi_square(samples: np.ndarray, probs: np.ndarray) -> float:
  counts = np.bincount(samples, minlength=len(probs))
  expected = len(samples) * probs
  return float(np.sum((counts - expected) ** 2 / expected))


def sample_many(logits_V: np.ndarray, n: int, **settings) -> np.ndarray:
  keys = jax.random.split(jax.random.key(123), n)
  draw = jax.vmap(lambda k: sample_logits(jnp.asarray(logits_V)[None], k, **settings)[0])
  return np.asarray(jax.jit(draw)(keys))


def test_temperature_frequencies_match_softmax():
  logits_V = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -0.5])
  temperature, n = 0.7, 20000
  samples = sample_many(logits_V, n, temperature=temperature, top_k=0, top_p=1.0)
  probs = np.exp(logits_V / temperature) / np.sum(np.exp(logits_V / temperature))
  untempered = np.exp(logits_V) / np.sum(np.exp(logits_V))
  # 20.52 is the 0.999 quantile of chi-square with 5 degrees of freedom.
  assert chi_square(samples, probs) < 20.52
  assert chi_square(samples, untempered) > 100.0, "the test must be able to tell temperatures apart"


def test_top_p_keeps_smallest_nucleus_and_renormalises():
  # Most likely tokens are deliberately not in index order, to exercise the un-sorting.
  probs_V = np.array([0.15, 0.5, 0.05, 0.3])
  logits_V = np.log(probs_V)
  n = 8000
  # A traced top_p (as inside `generate`) must behave like a Python one.
  for top_p, kept, crit in [(0.7, [1, 3], 10.83), (0.9, [1, 3, 0], 13.82),
                            (jnp.float32(0.9), [1, 3, 0], 13.82), (jnp.float32(1.0), [0, 1, 2, 3], 16.27)]:
    samples = sample_many(logits_V, n, temperature=1.0, top_k=0, top_p=top_p)
    assert set(np.unique(samples).tolist()) == set(kept)
    nucleus = np.zeros_like(probs_V)
    nucleus[kept] = probs_V[kept] / probs_V[kept].sum()
    counts = np.bincount(samples, minlength=4)[kept]
    expected = n * nucleus[kept]
    assert np.sum((counts - expected) ** 2 / expected) < crit  # chi-square 0.999 quantiles


def test_top_k_applies_before_top_p():
  # After top-k=2 the renormalised head is (4/7, 3/7): top_p=0.5 then keeps token 0 only, whereas
  # top-p on the unfiltered distribution (0.4 < 0.5) would also keep token 1.
  logits_V = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
  samples = sample_many(logits_V, 2000, temperature=1.0, top_k=2, top_p=0.5)
  assert set(np.unique(samples).tolist()) == {0}
  samples = sample_many(logits_V, 2000, temperature=1.0, top_k=0, top_p=0.5)
  assert set(np.unique(samples).tolist()) == {0, 1}


def test_top_k_never_emits_outside_top_k():
  rng = np.random.default_rng(0)
  logits_BxV = rng.normal(size=(4096, 50)).astype(np.float32)
  tokens_B = np.asarray(sample_logits(jnp.asarray(logits_BxV), jax.random.key(3), temperature=1.3,
                                     top_k=5, top_p=1.0))
  rank_B = np.sum(logits_BxV > logits_BxV[np.arange(4096), tokens_B][:, None], axis=1)
  assert rank_B.max() < 5
  assert set(rank_B.tolist()) == set(range(5))


def test_greedy_sample_logits_is_argmax():
  logits_BxV = np.random.default_rng(1).normal(size=(16, 30)).astype(np.float32)
  tokens_B = sample_logits(jnp.asarray(logits_BxV), jax.random.key(0), temperature=0.0, top_k=3,
                           top_p=0.5)
  np.testing.assert_array_equal(np.asarray(tokens_B), np.argmax(logits_BxV, axis=1))


def fill_after_first_eos(tokens_NxT: np.ndarray, eos_id: int, start: int) -> np.ndarray:
  out = tokens_NxT.copy()
  for row in out:
    hits = np.flatnonzero(row[start:] == eos_id)
    if hits.size:
      row[start + hits[0]:] = eos_id
  return out


def test_eos_stops_greedy_sequences():
  free = llama_greedy()
  eos_id = int(free[0, len(PROMPT) + 2])
  expected = fill_after_first_eos(free, eos_id, len(PROMPT))
  assert not np.array_equal(expected, free), "pick an eos that greedy emits before the end"
  np.testing.assert_array_equal(llama_greedy(eos_id=eos_id), expected)
  np.testing.assert_array_equal(llama_greedy(eos_id=-1), free)  # sentencepiece's "no eos piece"


def test_eos_stops_each_sampled_row_independently():
  free = llama_sampled(seed=11)
  # As eos, the token that the most rows emit, short of all of them: a mix of stopped and running rows.
  generated = free[:, len(PROMPT):]
  rows_with = {int(tok): int(np.any(generated == tok, axis=1).sum()) for tok in np.unique(generated)}
  eos_id = max((tok for tok, rows in rows_with.items() if rows < SAMPLED), key=rows_with.get)
  assert rows_with[eos_id] > 1
  stopped = llama_sampled(seed=11, eos_id=eos_id)
  np.testing.assert_array_equal(stopped, fill_after_first_eos(free, eos_id, len(PROMPT)))


@pytest.mark.parametrize("overrides, kind, fragment", [
    ({"prompt": []}, errors.ConfigError, "prompt is empty"),
    ({"max_length": 3}, errors.ConfigError,
     "--max_length=3 is not longer than the prompt (3 tokens); raise --max_length"),
    ({"max_length": 17}, errors.ConfigError, "--max_length=17 exceeds the 16 learned positions"),
    ({"num_return_sequences": 0}, errors.ConfigError, "--num_return_sequences=0 must be at least 1"),
    ({"temperature": -0.5}, errors.ConfigError, "--temperature=-0.5 is negative"),
    ({"top_p": 0.0}, errors.ConfigError, "--top_p=0.0 is outside (0, 1]"),
    ({"top_p": 1.5}, errors.ConfigError, "--top_p=1.5 is outside (0, 1]"),
    ({"top_k": -1}, errors.ConfigError, "--top_k=-1 is negative"),
    ({"temperature": float("nan")}, errors.ConfigError, "--temperature=nan is not a finite number"),
    ({"temperature": float("inf")}, errors.ConfigError, "--temperature=inf is not a finite number"),
    ({"max_length": 0}, errors.ConfigError, "--max_length=0 leaves no room to generate"),
    ({"prompt": [5, 97]}, errors.DataError, "the prompt has ids outside [0, 97)"),
    ({"eos_id": 97}, errors.DataError, "--eos_id has ids outside [0, 97)"),
])
def test_validation_errors(overrides, kind, fragment):
  cfg = tiny_config("gpt2")
  settings = dict(max_length=8, num_return_sequences=1, temperature=1.0, top_k=0, top_p=1.0,
                  seed=0, eos_id=None)
  prompt = overrides.pop("prompt", PROMPT)
  settings.update(overrides)
  with raises_one_line(kind, fragment):
    generate(None, cfg, prompt, **settings)


def test_validation_names_the_settings_as_the_caller_spells_them():
  with raises_one_line(errors.ConfigError, "--config.sample.top_p=0.0") as caught:
    sampling.check_request(tiny_config("gpt2"), 3, 8, 1, 1.0, 0, 0.0, prefix="--config.sample.")
  assert str(caught.value).startswith("--config.sample.top_p=0.0 is outside")


def test_kv_cache_over_the_memory_bound_is_refused():
  with raises_one_line(errors.ConfigError, "--max_length=16777216", "--num_return_sequences=64", "KV cache"):
    sampling.check_fits(dataclasses.replace(tiny_config("llama"), max_len=1 << 30), 1 << 24, 64)


@pytest.mark.parametrize("temperature, num, given, expected", [
    (0.8, 5, (), 5), (0.8, 3, ("num_return_sequences", "top_k", "top_p", "seed"), 3),  # sampling reads them all
    (0.0, 5, (), 1), (sampling.GREEDY_BELOW / 2, 5, (), 1),  # greedy without a count: one continuation
    (0.0, 1, ("num_return_sequences",), 1),
])
def test_greedy_decodes_one_continuation(temperature, num, given, expected):
  assert sampling.sequences_to_decode(temperature=temperature, num_return_sequences=num, given=given) == expected


@pytest.mark.parametrize("given, message", [
    (("top_k",), "--top_k is set but greedy decoding (--temperature=0) ignores it; drop it, or sample with a "
     "positive --temperature"),
    (("top_p",), "--top_p is set but greedy decoding"),
    (("seed",), "--seed is set but greedy decoding"),
    (("num_return_sequences",), "--num_return_sequences=5 would repeat the one continuation of greedy decoding "
     "(--temperature=0); drop it, or sample with a positive --temperature"),
])
def test_greedy_refuses_the_settings_it_would_ignore(given, message):
  with raises_one_line(errors.ConfigError, message) as caught:
    sampling.sequences_to_decode(temperature=0.0, num_return_sequences=5, given=given)
  assert str(caught.value).startswith(message)
