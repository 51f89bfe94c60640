"""The loss itself against a float64 numpy log-softmax, and the perplexity cap."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import metrics


def _reference(logits, targets, mask):
  """Masked NLL sum, token count and correct count, computed in float64 numpy from the definition."""
  x = logits.astype(np.float64)
  log_probs = x - x.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  correct = (x.argmax(-1) == targets).astype(np.float64)
  return (nll * mask).sum(), mask.sum(), (correct * mask).sum()


def test_cross_entropy_matches_a_float64_log_softmax():
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(3, 7, 11)) * 4).astype(np.float32)
  targets = rng.integers(0, 11, size=(3, 7))
  mask = (rng.random((3, 7)) < 0.7).astype(np.float32)
  got = metrics.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  want = _reference(logits, targets, mask)
  np.testing.assert_allclose([float(g) for g in got], want, rtol=1e-5)


def test_cross_entropy_is_stable_for_huge_logits_and_ignores_masked_positions():
  logits = np.zeros((1, 2, 4), np.float32)
  logits[0, 0] = [1e4, 0, 0, 0]  # float32 exp() would overflow without the log-sum-exp shift
  logits[0, 1] = [0, 0, 0, 50]  # masked: a confident right guess that must not count
  targets = np.array([[1, 3]])
  mask = np.array([[1.0, 0.0]], np.float32)
  nll, count, correct = metrics.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  assert float(nll) == pytest.approx(1e4, rel=1e-6) and float(count) == 1.0 and float(correct) == 0.0


def test_perplexity_is_exp_loss_and_capped():
  assert metrics.perplexity(math.log(75.3)) == pytest.approx(75.3)
  assert math.isfinite(metrics.perplexity(1e6))
