"""Schedules checked at warm-up, peak and end against their formulas; the weight-decay mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax import config as config_lib
from llm_jax import optim


def _optim_cfg(**kw) -> optim.OptimConfig:
  c = config_lib.get_config()
  c.optim.update({"learning_rate": 1e-3, "warmup_steps": 10, "min_lr_ratio": 0.1, **kw})
  return config_lib.optim_config(c)


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "rsqrt", "wsd"])
def test_warmup_is_linear_from_zero_to_peak(name):
  s = optim.make_schedule(_optim_cfg(schedule=name), 100)
  assert float(s(0)) == pytest.approx(0.0, abs=1e-12)
  assert float(s(5)) == pytest.approx(0.5e-3, rel=1e-6)
  assert float(s(10)) == pytest.approx(1e-3, rel=1e-6)


def test_end_values_follow_their_formulas():
  total = 100
  assert float(optim.make_schedule(_optim_cfg(schedule="constant"), total)(total)) == pytest.approx(1e-3)
  assert float(optim.make_schedule(_optim_cfg(schedule="linear"), total)(total)) == pytest.approx(1e-4)
  cosine = optim.make_schedule(_optim_cfg(schedule="cosine"), total)
  assert float(cosine(total)) == pytest.approx(1e-4, rel=1e-5)
  # Half-way through the decay the cosine is at the mid-point between peak and floor.
  assert float(cosine(10 + 45)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-5)
  rsqrt = optim.make_schedule(_optim_cfg(schedule="rsqrt"), total)
  assert float(rsqrt(40)) == pytest.approx(1e-3 * math.sqrt(10 / 40), rel=1e-5)


def test_warmup_stable_decay_holds_then_decays_linearly():
  s = optim.make_schedule(_optim_cfg(schedule="wsd", decay_fraction=0.2), 100)
  # Warm-up 10, stable until 80, linear decay over the last 20 steps.
  assert float(s(50)) == pytest.approx(1e-3)
  assert float(s(80)) == pytest.approx(1e-3)
  assert float(s(90)) == pytest.approx(1e-3 - 0.5 * (1e-3 - 1e-4), rel=1e-5)
  assert float(s(100)) == pytest.approx(1e-4, rel=1e-5)


def test_decay_mask_spares_norms_biases_and_position_table():
  params = {"embed": 1, "pos_embed": 1, "final_norm": {"scale": 1, "bias": 1},
            "layers": {"attn": {"query": 1, "query_bias": 1, "out": 1}, "mlp": {"fc": 1, "fc_bias": 1}}}
  mask = optim.decay_mask(params)
  assert mask == {"embed": True, "pos_embed": False, "final_norm": {"scale": False, "bias": False},
                  "layers": {"attn": {"query": True, "query_bias": False, "out": True},
                             "mlp": {"fc": True, "fc_bias": False}}}


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_weight_decay_only_touches_masked_parameters(name):
  c = _optim_cfg(name=name, schedule="constant", warmup_steps=0, weight_decay=0.5, grad_clip_norm=0.0,
                 momentum=0.0)
  tx, _ = optim.make_optimizer(c, 10)
  params = {"kernel": jnp.ones((3,)), "norm": {"scale": jnp.ones((3,))}}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # With zero gradients only decoupled decay moves a parameter: p ← p − lr·wd·p.
  np.testing.assert_allclose(new["kernel"], 1 - 1e-3 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(new["norm"]["scale"], 1.0)


def test_gradient_clipping_bounds_the_update_norm():
  c = _optim_cfg(name="sgd", schedule="constant", warmup_steps=0, weight_decay=0.0, momentum=0.0,
                 grad_clip_norm=1.0, learning_rate=1.0)
  tx, _ = optim.make_optimizer(c, 10)
  params = {"w": jnp.zeros((4,))}
  updates, _ = tx.update({"w": jnp.full((4,), 10.0)}, tx.init(params), params)
  assert float(optax.global_norm(updates)) == pytest.approx(1.0, rel=1e-6)
