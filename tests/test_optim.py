"""Schedules checked at warm-up, peak and end against their formulas; the weight-decay mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import raises_one_line

from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import optim


def _optim_cfg(**kw) -> optim.OptimConfig:
  c = config_lib.get_config()
  c.optim.update({"learning_rate": 1e-3, "warmup_steps": 10, "min_lr_ratio": 0.1, **kw})
  return config_lib.resolve(c).optim


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


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_weight_decay_only_touches_masked_parameters(name):
  extra = {"momentum": 0.0} if name == "sgd" else {}
  c = _optim_cfg(name=name, schedule="constant", warmup_steps=0, weight_decay=0.5, grad_clip_norm=0.0, **extra)
  tx, _ = optim.make_optimizer(c, 10)
  # A 2-D kernel, so that Muon orthogonalises it (a zero gradient orthogonalises to a zero update).
  params = {"kernel": jnp.ones((4, 4)), "norm": {"scale": jnp.ones((3,))}}
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


def _tiny_tree():
  """A model-shaped tree: a scanned (N, D, H, K) projection, an (N, H, K, D) output, an (N, D, F) MLP matrix,
  a bias, a norm scale, the embedding and an untied head."""
  shapes = {"embed": (16, 8), "lm_head": (8, 16), "final_norm": {"scale": (8,)},
            "layers": {"attn": {"query": (2, 8, 2, 4), "out": (2, 2, 4, 8)},
                       "mlp": {"fc": (2, 8, 12), "fc_bias": (2, 12)}}}
  leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(0), 2 * len(leaves))
  params = tree.unflatten([jax.random.normal(k, s) for k, s in zip(keys[::2], leaves)])
  grads = tree.unflatten([jax.random.normal(k, s) for k, s in zip(keys[1::2], leaves)])
  return params, grads


def test_param_groups_and_muon_dimension_numbers():
  params, _ = _tiny_tree()
  assert optim.param_groups(params) == {
      "embed": "embed", "lm_head": "head", "final_norm": {"scale": "norm"},
      "layers": {"attn": {"query": "matrix", "out": "matrix"}, "mlp": {"fc": "matrix", "fc_bias": "bias"}}}
  dims = optim.muon_dimension_numbers(params)
  assert dims["layers"]["attn"]["query"] == optax.contrib.MuonDimensionNumbers(1, (2, 3))
  assert dims["layers"]["attn"]["out"] == optax.contrib.MuonDimensionNumbers((1, 2), 3)
  assert dims["embed"] is None and dims["lm_head"] is None and dims["layers"]["mlp"]["fc_bias"] is None


def test_muon_orthogonalises_matrices_and_adamw_updates_the_rest():
  params, grads = _tiny_tree()
  c = _optim_cfg(name="muon", schedule="constant", warmup_steps=0, weight_decay=0.0, grad_clip_norm=0.0,
                 learning_rate=0.02, adam_learning_rate=1e-3)
  tx, _ = optim.make_optimizer(c, 10)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Second implementation: plain optax Muon on each layer's matrix reshaped to 2-D (inputs, outputs) ...
  plain = optax.contrib.muon(0.02)
  for path, to_2d in ((("attn", "query"), lambda x: x.reshape(8, 8)), (("attn", "out"), lambda x: x.reshape(8, 8)),
                      (("mlp", "fc"), lambda x: x)):
    for layer in range(2):
      g = to_2d(grads["layers"][path[0]][path[1]][layer])
      p = to_2d(params["layers"][path[0]][path[1]][layer])
      expected, _ = plain.update(g, plain.init(p), p)
      got = to_2d(updates["layers"][path[0]][path[1]][layer])
      np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6)
  # ... and plain optax AdamW at the AdamW group's own rate for the embedding, head, norm and bias.
  adam = optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
  for get in (lambda t: t["embed"], lambda t: t["lm_head"], lambda t: t["final_norm"]["scale"],
              lambda t: t["layers"]["mlp"]["fc_bias"]):
    expected, _ = adam.update(get(grads), adam.init(get(params)), get(params))
    np.testing.assert_allclose(get(updates), expected, rtol=1e-5, atol=1e-9)


def test_lr_multipliers_scale_each_group_update():
  params, grads = _tiny_tree()
  base = {"schedule": "constant", "warmup_steps": 0, "weight_decay": 0.1, "grad_clip_norm": 0.0}
  tx, _ = optim.make_optimizer(_optim_cfg(**base), 10)
  scaled_tx, _ = optim.make_optimizer(_optim_cfg(lr_multipliers="embed=0.5, matrix=2,norm=0", **base), 10)
  plain, _ = tx.update(grads, tx.init(params), params)
  scaled, _ = scaled_tx.update(grads, scaled_tx.init(params), params)
  factors = {"embed": 0.5, "matrix": 2.0, "norm": 0.0, "head": 1.0, "bias": 1.0}
  groups = optim.param_groups(params)
  for g, a, b in zip(jax.tree.leaves(groups), jax.tree.leaves(plain), jax.tree.leaves(scaled)):
    np.testing.assert_allclose(b, factors[g] * a, rtol=1e-6)


@pytest.mark.parametrize("spec", ["embed", "embed=x", "layer=2", "embed=-1", "embed=1,embed=2"])
def test_bad_lr_multipliers_are_refused_in_one_line(spec):
  with pytest.raises(ValueError, match="optim.lr_multipliers entry"):
    optim.parse_lr_multipliers(spec)


def test_schedule_free_eval_params_are_the_averaged_iterate():
  params, grads = _tiny_tree()
  c = _optim_cfg(name="schedule_free_adamw", schedule="constant", warmup_steps=2, b1=0.9)
  tx, _ = optim.make_optimizer(c, 10)
  state = tx.init(params)
  assert optim.eval_params(state, params) is not params
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  # x = (y - (1 - b1)·z) / b1, with z the schedule-free state's base iterate (behind the clipping state).
  z = state[1].z
  expected = jax.tree.map(lambda y, zi: (y - 0.1 * zi) / 0.9, params, z)
  for a, b in zip(jax.tree.leaves(optim.eval_params(state, params)), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(jax.tree.leaves(expected)[0], jax.tree.leaves(params)[0])
  adamw, _ = optim.make_optimizer(_optim_cfg(), 10)
  assert optim.eval_params(adamw.init(params), params) is params


@pytest.mark.parametrize("name, explicit, expected", [
    ("muon", 0.0, 0.02), ("adamw", 0.0, 3e-3),  # the optima of experiments/ablation_optimizer.py's grid
    ("adamw", 0.02, 0.02), ("sgd", 0.5, 0.5)])  # a rate that is set always wins, the default's own included
def test_unset_learning_rate_takes_the_optimizers_measured_best(name, explicit, expected):
  c = config_lib.get_config()
  c.optim.update({"name": name, "learning_rate": explicit})
  assert config_lib.resolve(c).optim.learning_rate == expected
  warm = optim.make_schedule(config_lib.resolve(c).optim, 1000)
  assert float(warm(c.optim.warmup_steps)) == pytest.approx(expected, rel=1e-6)  # the peak the run trains at


@pytest.mark.parametrize("name", ["sgd", "lion", "adafactor", "schedule_free_adamw"])
def test_an_optimizer_without_a_measured_rate_needs_one_set(name):
  c = config_lib.get_config()
  c.optim.name = name
  with raises_one_line(errors.ConfigError, "optim.learning_rate", f"optim.name='{name}'",
                       "--config.optim.learning_rate="):
    config_lib.resolve(c)
