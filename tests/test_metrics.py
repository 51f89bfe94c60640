"""The loss itself against a float64 numpy log-softmax, the z-loss and its gradient, and the perplexity cap."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax import metrics
from llm_jax import steps as steps_lib
from llm_jax.model import Transformer
from llm_jax.model_config import ModelConfig


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


def test_z_loss_sum_is_the_masked_sum_of_squared_log_normalisers():
  rng = np.random.default_rng(2)
  logits = (rng.normal(size=(2, 5, 13)) * 3).astype(np.float32)
  mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  assert float(metrics.z_loss_sum(jnp.asarray(logits), jnp.asarray(mask))) == pytest.approx(
      (log_z**2 * mask).sum(), rel=1e-5)


@pytest.mark.slow
def test_z_loss_enters_the_gradient_and_is_logged_but_not_in_the_loss():
  cfg = ModelConfig(vocab_size=31, num_layers=1, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8, d_ff=32,
                    max_len=8)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 31, (4, 8)).astype(np.int32), "targets": rng.integers(0, 31, (4, 8)).astype(
      np.int32), "segment_ids": np.ones((4, 8), np.int32), "positions": np.tile(np.arange(8, dtype=np.int32), (4, 1)),
           "loss_mask": (rng.random((4, 8)) > 0.2).astype(np.float32)}
  tx = optax.sgd(1.0)  # the parameter change is minus the gradient
  state = jax.jit(lambda: steps_lib._init_state(cfg, tx, 0, 8)[0])()  # pylint: disable=protected-access
  step = jax.jit(functools.partial(steps_lib.train_step, model=Transformer(cfg), tx=tx, schedule=lambda _: 1.0,
                                   accum=1, z_loss=1e-2))
  new_state, m = step(state, batch)

  def objective(params):  # written from the definition: mean NLL + 1e-2 · mean log(Z)² over counted tokens
    logits = Transformer(cfg).apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])[0]
    log_z = jax.nn.logsumexp(logits, -1)
    nll = log_z - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    return jnp.sum((nll + 1e-2 * log_z**2) * mask) / mask.sum(), (jnp.sum(nll * mask) / mask.sum(),
                                                                  jnp.sum(log_z**2 * mask) / mask.sum())

  (_, (nll, z)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(state.params)
  assert float(m["loss"]) == pytest.approx(float(nll), rel=1e-5)
  assert float(m["z_loss"]) == pytest.approx(float(z), rel=1e-5) and float(z) > 0
  for g, before, after in zip(jax.tree.leaves(grads), jax.tree.leaves(state.params), jax.tree.leaves(new_state.params)):
    np.testing.assert_allclose(before - after, g, rtol=1e-4, atol=1e-7)
