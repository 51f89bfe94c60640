"""Tests for zero-shot scoring: hand-checked answers of hand-built models on the example file, and exact scores."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf
from conftest import raises_one_line

from llm_jax import errors
from llm_jax.evals import documents as doc_eval
from llm_jax.evals import scoring
from llm_jax.model import Transformer
from llm_jax.model import abstract_params
from llm_jax.model_config import ModelConfig
from llm_jax.tokenizer import load_tokenizer

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "experiments", "data", "zero_shot_example.jsonl")
VOWELS = "aeiouAEIOU"


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
  """One id per character of the example file, so a choice of n characters is n tokens."""
  text = "".join(item.context + "".join(item.choices) for item in scoring.read_items(EXAMPLE))
  return load_tokenizer(tiny_hf.char_tokenizer(str(tmp_path_factory.mktemp("chars")), text))


def _cfg(vocab_size: int) -> ModelConfig:
  return ModelConfig(family="llama", vocab_size=vocab_size, num_layers=1, d_model=16, num_heads=2, num_kv_heads=1,
                     head_dim=8, d_ff=32, max_len=128, tie_embeddings=False)


def _unigram_params(cfg: ModelConfig, logits_V: np.ndarray):
  """A model whose next-token logits are `logits_V` whatever the input.

  Every block weight is zero, so blocks add nothing to the residual; the embedding of every token is
  all ones, which the final RMSNorm keeps, and the head maps that vector to `logits_V`.
  """
  params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), nn.unbox(abstract_params(cfg)))
  params["embed"][:] = 1.0
  params["final_norm"]["scale"][:] = 1.0
  params["lm_head"][:] = logits_V / cfg.d_model
  return params


def test_uniform_model_prefers_the_shortest_choice(char_tok):
  """All-equal logits: every character costs ln V, so the summed rule picks the fewest characters.

  Choices with their leading space, item by item: bad 4 < good 5; bad 4 < good 5; terrible 9 < wonderful 10;
  blue 5 < strong 7 < asleep at night 16; tall 5 < equal 6 < hungry 7; religion 9 < breakfast = railroads 10;
  Paris 6 < London 7 < Washington 11; nation 7 < bicycle 8 < sandwich 9. Right on items 2, 6 and 8: 3 / 8.
  """
  cfg = _cfg(char_tok.vocab_size)
  items = scoring.read_items(EXAMPLE)
  result = scoring.zero_shot(_unigram_params(cfg, np.zeros(cfg.vocab_size)), cfg, char_tok, items, batch_size=4)
  assert result.predictions == [0, 0, 0, 1, 1, 1, 1, 0]
  assert result.labels == [1, 0, 1, 0, 0, 1, 0, 0]
  assert result.accuracy == 3 / 8
  for item, ll, n in zip(items, result.log_likelihoods, result.num_tokens):
    assert n == [len(c) for c in item.choices]
    np.testing.assert_allclose(ll, [-len(c) * math.log(cfg.vocab_size) for c in item.choices], rtol=1e-5)


def test_vowel_model_per_token_rule_prefers_the_most_vowels(char_tok):
  """Logit 1 for vowels, 0 otherwise: per token, the score is (vowel share) - log Z, so the highest share wins.

  Vowel shares: bad 1/4 < good 2/5; bad < good; terrible 3/9 > wonderful 3/10; blue 2/5 > asleep at night 5/16 >
  strong 1/7; equal 3/6 > tall 1/5 > hungry 1/7; religion 4/9 > railroads 4/10 > breakfast 3/10;
  Paris 2/6 > London 2/7 > Washington 3/11; nation 3/7 > bicycle 2/8 > sandwich 2/9. Right on 1, 5, 6, 8: 4 / 8.
  """
  cfg = _cfg(char_tok.vocab_size)
  logits = np.array([1.0 if char_tok.id_to_piece(i) in VOWELS else 0.0 for i in range(cfg.vocab_size)])
  result = scoring.zero_shot(_unigram_params(cfg, logits), cfg, char_tok, scoring.read_items(EXAMPLE))
  assert result.predictions_norm == [1, 1, 0, 1, 0, 1, 1, 0]
  assert result.accuracy_norm == 4 / 8
  evaluator = doc_eval.TrainingEvaluator(cfg, char_tok, text_sets={}, zero_shot_files=[EXAMPLE], seq_len=cfg.max_len)
  metrics = evaluator(_unigram_params(cfg, logits))
  assert metrics == {"zero_shot/zero_shot_example/accuracy": result.accuracy,
                     "zero_shot/zero_shot_example/accuracy_norm": 0.5}


def test_scores_equal_log_softmax_of_the_full_sequence(char_tok):
  """A random model: each choice's score is the sum of its tokens' log-probabilities in one forward pass."""
  cfg = _cfg(char_tok.vocab_size)
  params = Transformer(cfg).init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"]
  params = nn.unbox(params)
  items = scoring.read_items(EXAMPLE)[:3]
  result = scoring.zero_shot(params, cfg, char_tok, items, batch_size=8)
  pairs = [(char_tok.encode(item.context), char_tok.encode(choice)) for item in items for choice in item.choices]
  ids_NxL = np.zeros((len(pairs), 96), np.int32)  # right padding cannot change causal logits before it
  for r, (context_ids, choice_ids) in enumerate(pairs):
    ids = [char_tok.bos_id] + context_ids + choice_ids
    ids_NxL[r, :len(ids)] = ids
  logp_NxLxV = np.asarray(jax.nn.log_softmax(Transformer(cfg).apply({"params": params}, ids_NxL)[0], axis=-1))
  expected = [sum(logp_NxLxV[r, len(c) + k, t] for k, t in enumerate(choice_ids))
              for r, (c, choice_ids) in enumerate(pairs)]
  np.testing.assert_allclose(sum(result.log_likelihoods, []), expected, rtol=1e-5)


def test_trailing_context_whitespace_moves_to_the_choice(char_tok):
  assert scoring.encode_pair(char_tok, "the film was ", "good") == scoring.encode_pair(char_tok, "the film was",
                                                                                       " good")


def test_long_contexts_keep_their_latest_tokens(char_tok):
  item = scoring.Item(context="a" * 300, choices=("bb", "c"), label=0)
  rows = scoring.make_choice_rows([item], char_tok, max_len=64)
  assert rows["inputs"].shape == (2, 64)
  assert rows["loss_mask"].sum(axis=1).tolist() == [2.0, 1.0]
  assert char_tok.decode(rows["targets"][0]) == "a" * 62 + "bb"


@pytest.mark.parametrize("line, message", [
    ("not json", "not valid JSON"),
    ('["a"]', "expected an object"),
    ('{"context": 1, "choices": ["a", "b"], "label": 0}', "'context' must be a string"),
    ('{"context": "x", "choices": ["a"], "label": 0}', "at least two non-empty strings"),
    ('{"context": "x", "choices": ["a", "b"], "label": 2}', "'label' must be an integer index into the 2"),
    ('{"context": "x", "choices": ["a", "b"], "label": true}', "'label' must be an integer"),
])
def test_bad_items_name_the_line(tmp_path, line, message):
  path = tmp_path / "items.jsonl"
  path.write_text('{"context": "ok", "choices": ["a", "b"], "label": 1}\n\n' + line + "\n")
  with raises_one_line(errors.DataError, f"{path}:3: ", message) as excinfo:
    scoring.read_items(str(path))
  assert str(excinfo.value).startswith(f"{path}:3: ")


def test_missing_and_empty_files(tmp_path):
  with raises_one_line(errors.MissingFileError, str(tmp_path / "none.jsonl"), "does not exist"):
    scoring.read_items(str(tmp_path / "none.jsonl"))
  (tmp_path / "empty.jsonl").write_text("\n")
  with raises_one_line(errors.DataError, str(tmp_path / "empty.jsonl"), "has no items"):
    scoring.read_items(str(tmp_path / "empty.jsonl"))
