"""Tests for llm_jax.model against independent references: gradients, numpy, formulas, rewritten params."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llm_jax.attention import apply_rope
from llm_jax.attention import attention_mask
from llm_jax.attention import dot_product_attention
from llm_jax.attention import rope_inverse_frequencies
from llm_jax.model import Mlp
from llm_jax.model import Transformer
from llm_jax.model import abstract_params
from llm_jax.model import count_non_embedding_params
from llm_jax.model import count_params
from llm_jax.model import resolve_remat_policy
from llm_jax.model_config import ModelConfig

LENGTH = 16


def tiny_config(family: str, **overrides) -> ModelConfig:
  base = ModelConfig(family=family, vocab_size=97, num_layers=2, d_model=64, num_heads=4,
                     num_kv_heads=2 if family == "llama" else 4, head_dim=16, d_ff=128,
                     max_len=LENGTH)
  return dataclasses.replace(base, **overrides)


def init_params(cfg: ModelConfig, seed: int = 0):
  """Random float32 params in the model's own tree (from `eval_shape` of init), built in numpy.

  Compiling `model.init` costs seconds per config; these trees cost none, and random norm scales and
  biases exercise more of the model than the ones and zeros of a fresh init.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.normal(0.0, 0.02, leaf.shape).astype(np.float32)
    return jnp.asarray(noise + 1.0 if path[-1].key == "scale" else noise)

  return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract_params(cfg)))


def forward(cfg: ModelConfig):
  """The jitted logits function: one compile instead of hundreds of eagerly dispatched ops."""
  return jax.jit(lambda params, *args: Transformer(cfg).apply({"params": params}, *args)[0])


def random_tokens(shape, seed: int = 1) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed).integers(0, 97, size=shape), jnp.int32)


@pytest.mark.parametrize("family, impl", [("gpt2", "einsum"), ("llama", "einsum"), ("llama", "jax")])
def test_causality_through_gradients(family, impl):
  # Untied head and distinct tokens: each embedding row then feeds exactly one input position, so the
  # gradient with respect to row tokens[s] is the gradient with respect to the input at position s.
  cfg = tiny_config(family, tie_embeddings=False, attention_impl=impl)
  params = init_params(cfg)
  rng = np.random.default_rng(2)
  tokens_L = jnp.asarray(rng.permutation(97)[:LENGTH], jnp.int32)
  probe_V = jnp.asarray(rng.normal(size=97), jnp.float32)
  model = Transformer(cfg)

  def projected_logits_L(embed_VxD):
    logits_1xLxV, _ = model.apply({"params": {**params, "embed": embed_VxD}}, tokens_L[None])
    return logits_1xLxV[0] @ probe_V

  jac_LxVxD = jax.jit(jax.jacrev(projected_logits_L))(params["embed"])
  influence_LxL = np.asarray(jnp.abs(jac_LxVxD[:, tokens_L]).sum(-1))  # [output t, input s]
  future = np.triu(np.ones((LENGTH, LENGTH), bool), k=1)
  assert np.all(influence_LxL[future] == 0.0)
  assert np.all(influence_LxL[~future] > 0.0)


def numpy_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxLxS=None):
  q, k, v = (np.asarray(x, np.float64) for x in (q_BxLxHxK, k_BxSxGxK, v_BxSxGxK))
  b, l, h, d = q.shape
  s, g = k.shape[1], k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    causal_LxS = np.tril(np.ones((l, s), bool)) if mask_BxLxS is None else np.asarray(mask_BxLxS[bi])
    for hi in range(h):
      gi = hi // (h // g)  # query head hi reads key/value head hi // R
      scores = q[bi, :, hi] @ k[bi, :, gi].T / np.sqrt(d)
      scores = np.where(causal_LxS, scores, -np.inf)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      out[bi, :, hi] = weights @ v[bi, :, gi]
  return out


@pytest.mark.parametrize("impl", ["einsum", "jax"])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_dot_product_attention_matches_numpy(num_kv_heads, impl):
  b, l, h, d = 2, 7, 4, 8
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(b, l, h, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, l, num_kv_heads, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, l, num_kv_heads, d)), jnp.float32)
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((l, l), bool)), (b, l, l))
  attend = jax.jit(dot_product_attention, static_argnames="impl")
  got = attend(q, k, v, mask, impl=impl)
  np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v), atol=2e-6, rtol=1e-5)
  # Grouped-query attention is multi-head attention with each KV head repeated R = H/G times.
  repeated = attend(q, jnp.repeat(k, h // num_kv_heads, axis=2), jnp.repeat(v, h // num_kv_heads, axis=2),
                    mask, impl=impl)
  np.testing.assert_allclose(np.asarray(got), np.asarray(repeated), atol=1e-6)


@pytest.mark.parametrize("blocks", [2, 4, 3])  # 3 does not divide the 8 slots: one block
def test_causal_blocks_compute_the_full_attention_over_packed_documents(blocks):
  b, l, h, g, d = 2, 8, 4, 2, 8
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(b, l, n, d)), jnp.float32) for n in (h, g, g))
  slots_BxL = jnp.broadcast_to(jnp.arange(l), (b, l))
  segments_BxL = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 3], [1] * l])
  mask_BxLxS = attention_mask(slots_BxL, slots_BxL, segments_BxL, segments_BxL)
  attend = functools.partial(dot_product_attention, mask_BxLxS=mask_BxLxS)
  got = jax.jit(functools.partial(attend, blocks=blocks))(q, k, v)
  np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, mask_BxLxS), atol=2e-6, rtol=1e-5)
  weights = jnp.asarray(rng.normal(size=got.shape), jnp.float32)
  grads = [jax.grad(lambda *qkv, n=n: jnp.sum(attend(*qkv, blocks=n) * weights), argnums=(0, 1, 2))(q, k, v)
           for n in (1, blocks)]
  for one, blocked in zip(*grads):
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(one), atol=1e-5, rtol=1e-5)
  dots = str(jax.make_jaxpr(functools.partial(attend, blocks=blocks))(q, k, v)).count("dot_general")
  assert dots == 2 * (blocks if l % blocks == 0 else 1)  # scores and values, per block that runs


def test_rope_scores_depend_only_on_relative_position():
  cfg = tiny_config("llama", head_dim=32)
  inv_freq = rope_inverse_frequencies(cfg)
  q_1x1x1xK, k_1x1x1xK = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, 1, 1, 32)), jnp.float32)

  @jax.jit
  def score_fn(m, n):
    return jnp.sum(apply_rope(q_1x1x1xK, m, inv_freq) * apply_rope(k_1x1x1xK, n, inv_freq))

  def score(m, n):
    return float(score_fn(jnp.array([[m]]), jnp.array([[n]])))

  for shift in [0, 1, 5, 37]:
    scores = [score(n + shift, n) for n in [0, 3, 11, 250]]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
  assert abs(score(5, 0) - score(6, 0)) > 1e-3, "scores must actually vary with the shift"


def test_rope_preserves_norms():
  cfg = tiny_config("llama")
  rng = np.random.default_rng(0)
  x_BxLxHxK = rng.normal(size=(2, 9, 3, cfg.head_dim)).astype(np.float32)
  positions_BxL = rng.integers(0, 5000, size=(2, 9))
  y = jax.jit(apply_rope)(x_BxLxHxK, positions_BxL, rope_inverse_frequencies(cfg))
  assert not np.allclose(np.asarray(y), x_BxLxHxK)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1), np.linalg.norm(x_BxLxHxK, axis=-1),
                             rtol=1e-5)


def test_llama3_rope_frequency_scaling():
  cfg = tiny_config("llama", head_dim=128, rope_theta=500000.0)
  plain = np.asarray(rope_inverse_frequencies(cfg), np.float64)
  expected = 500000.0 ** (-np.arange(0, 128, 2) / 128)
  np.testing.assert_allclose(plain, expected, rtol=1e-5)

  scaled_cfg = dataclasses.replace(cfg, rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                                   rope_high_freq_factor=4.0, rope_original_max_len=8192)
  scaled = np.asarray(rope_inverse_frequencies(scaled_cfg), np.float64)
  wavelen = 2 * np.pi / expected
  high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
  assert high.sum() > 0 and low.sum() > 0 and (~high & ~low).sum() > 0
  np.testing.assert_allclose(scaled[high], expected[high], rtol=1e-5)
  np.testing.assert_allclose(scaled[low], expected[low] / 8.0, rtol=1e-5)
  # In between, Llama 3.1 interpolates linearly in 8192 / wavelength between the two regimes.
  medium = ~high & ~low
  smooth = (8192 / wavelen[medium] - 1.0) / (4.0 - 1.0)
  np.testing.assert_allclose(scaled[medium],
                             (1 - smooth) * expected[medium] / 8.0 + smooth * expected[medium], rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_documents_do_not_attend_across(family):
  cfg = tiny_config(family)
  params = init_params(cfg)
  logits = forward(cfg)
  split = 7
  tokens_1xL = random_tokens((1, LENGTH))
  segments_1xL = jnp.array([[1] * split + [2] * (LENGTH - split)])
  positions_1xL = jnp.array([list(range(split)) + list(range(LENGTH - split))])
  packed = logits(params, tokens_1xL, positions_1xL, segments_1xL)
  # Each document alone, from position 0, as one unsegmented row (right padding cannot reach back).
  arange_1xL, ones_1xL = jnp.arange(LENGTH)[None], jnp.ones((1, LENGTH), jnp.int32)
  first_alone = logits(params, tokens_1xL, arange_1xL, ones_1xL)[:, :split]
  second_alone = logits(params, jnp.roll(tokens_1xL, -split, axis=1), arange_1xL, ones_1xL)
  second_alone = second_alone[:, :LENGTH - split]
  np.testing.assert_allclose(packed[:, :split], first_alone, atol=1e-5)
  np.testing.assert_allclose(packed[:, split:], second_alone, atol=1e-5)
  leaky = logits(params, tokens_1xL, positions_1xL, ones_1xL)
  assert np.abs(np.asarray(leaky[:, split:] - second_alone)).max() > 1e-3, "test must be able to fail"


def test_llama_logits_depend_only_on_relative_positions():
  # RoPE on queries and keys, and no absolute position embedding: shifting every position is a no-op.
  cfg = tiny_config("llama")
  params, logits = init_params(cfg), forward(cfg)
  tokens_2xL = random_tokens((2, LENGTH))
  positions_2xL = jnp.broadcast_to(jnp.arange(LENGTH), (2, LENGTH))
  segments_2xL = jnp.ones((2, LENGTH), jnp.int32)
  want = logits(params, tokens_2xL, positions_2xL, segments_2xL)
  got = logits(params, tokens_2xL, positions_2xL + jnp.array([[3], [1000]]), segments_2xL)
  np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scanned_and_unrolled_layers_agree(family):
  cfg = tiny_config(family, scan_layers=False)
  unrolled = init_params(cfg)
  layers = [unrolled.pop(f"layers_{i}") for i in range(cfg.num_layers)]
  scanned = {**unrolled, "layers": jax.tree.map(lambda *x: jnp.stack(x), *layers)}
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
  assert jax.tree.structure(scanned) == jax.tree.structure(init_params(scanned_cfg))
  tokens = random_tokens((2, LENGTH))
  want = forward(cfg)({**unrolled, **{f"layers_{i}": p for i, p in enumerate(layers)}}, tokens)
  got = forward(scanned_cfg)(scanned, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)


def loss_and_grads(cfg: ModelConfig, params, tokens_BxL):
  def loss(p):
    logits, _ = Transformer(cfg).apply({"params": p}, tokens_BxL[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1))
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("scan_layers, policies", [(True, ["full", "dots", "auto"]), (False, ["full"])])
def test_remat_policies_match_no_remat(scan_layers, policies):
  cfg = tiny_config("llama", scan_layers=scan_layers, remat_policy="none")
  params = init_params(cfg)
  tokens = random_tokens((2, LENGTH + 1))
  want_loss, want_grads = loss_and_grads(cfg, params, tokens)
  for policy in policies:
    got_loss, got_grads = loss_and_grads(dataclasses.replace(cfg, remat_policy=policy), params, tokens)
    np.testing.assert_allclose(got_loss, want_loss, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_grads, want_grads)


def test_auto_remat_is_the_measured_choice_per_backend_and_an_explicit_policy_wins():
  # BENCHMARKS.md: recomputing dots beats saving activations on XLA:CPU; accelerators save (unmeasured there).
  assert [resolve_remat_policy("auto", b) for b in ("cpu", "gpu", "tpu")] == ["dots", "none", "none"]
  assert [resolve_remat_policy(p, "cpu") for p in ("none", "full", "dots_saveable")] == ["none", "full",
                                                                                            "dots_saveable"]
  assert resolve_remat_policy("dots", "gpu") == "dots"
  # The default config reaches the model as 'auto' and, on this CPU backend, traces a remat (checkpointed) block.
  tokens = jnp.zeros((1, 4), jnp.int32)

  def traced(cfg: ModelConfig) -> str:
    return str(jax.make_jaxpr(lambda p: Transformer(cfg).apply({"params": p}, tokens)[0])(init_params(cfg)))

  assert ModelConfig().remat_policy == "auto" and jax.default_backend() == "cpu"
  assert "remat" in traced(tiny_config("gpt2"))
  assert "remat" not in traced(tiny_config("gpt2", remat_policy="none"))


def test_logical_axis_annotations():
  cfg = tiny_config("llama")
  # eval_shape of `model.init` carries the same annotation boxes as a real init, without the compute.
  variables = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  params = nn.get_partition_spec(variables)["params"]
  assert params["embed"] == P("vocab", "embed")
  assert params["layers"]["attn"]["query"] == P("layers", "embed", "heads", "head_dim")
  assert params["layers"]["attn"]["key"] == P("layers", "embed", "kv_heads", "head_dim")
  assert params["layers"]["attn"]["out"] == P("layers", "heads", "head_dim", "embed")
  assert params["layers"]["mlp"]["down"] == P("layers", "mlp", "embed")
  unrolled = nn.get_partition_spec(abstract_params(tiny_config("gpt2", scan_layers=False)))
  assert unrolled["layers_0"]["attn"]["query"] == P("embed", "heads", "head_dim")
  assert unrolled["pos_embed"] == P("positions", "embed")


@pytest.mark.parametrize("family, tie, qk_norm", [("gpt2", True, False), ("llama", True, False),
                                                   ("llama", False, False), ("gpt2", False, True),
                                                   ("llama", True, True)])
def test_count_non_embedding_params_matches_tree(family, tie, qk_norm):
  cfg = tiny_config(family, tie_embeddings=tie, qk_norm=qk_norm)
  params = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                                   jnp.zeros((1, LENGTH), jnp.int32))["params"])
  embedding = params["embed"].size + sum(params[k].size for k in ("pos_embed", "lm_head") if k in params)
  assert count_non_embedding_params(cfg) == count_params(params) - embedding


def test_abstract_params_of_a_1b_llama_by_formula():
  cfg = ModelConfig(family="llama", vocab_size=32000, num_layers=16, d_model=2048, num_heads=32,
                    num_kv_heads=8, head_dim=64, d_ff=8192, max_len=2048)
  params = abstract_params(cfg)
  leaves = jax.tree.leaves(nn.unbox(params))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert nn.unbox(params)["layers"]["attn"]["query"].shape == (16, 2048, 32, 64)
  n, d, h, g, k, f, v = 16, 2048, 32, 8, 64, 8192, 32000
  per_layer = d * h * k * 2 + d * g * k * 2 + 3 * d * f + 2 * d
  expected = n * per_layer + d + v * d
  assert count_params(params) == expected == 1_038_682_112
  assert count_non_embedding_params(cfg) == expected - v * d


def test_bfloat16_compute_is_close_to_float32():
  cfg = tiny_config("llama")
  params = init_params(cfg)
  tokens = random_tokens((2, LENGTH))
  want = forward(cfg)(params, tokens)
  got = forward(dataclasses.replace(cfg, compute_dtype="bfloat16"))(params, tokens)
  assert got.dtype == jnp.float32
  err = float(jnp.max(jnp.abs(got - want)))
  assert 0 < err < 0.05 * float(jnp.max(jnp.abs(want)))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_qk_norm_makes_the_output_blind_to_the_scale_of_queries_and_keys(family):
  tokens = random_tokens((2, LENGTH))
  for qk_norm in (True, False):
    cfg = tiny_config(family, qk_norm=qk_norm, norm_eps=1e-12)  # eps would break the exact invariance
    params = init_params(cfg)
    if qk_norm:
      assert params["layers"]["attn"]["query_norm"]["scale"].shape == (2, cfg.head_dim)
    # RMSNorm after the projection cancels any common factor of W_q (and its bias): q·10 normalises to q.
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 10.0 if len(path) > 1 and path[-2].key == "attn"
        and path[-1].key.startswith(("query", "key")) else x, params)
    logits, logits_scaled = forward(cfg)(params, tokens), forward(cfg)(scaled, tokens)
    if qk_norm:
      np.testing.assert_allclose(logits_scaled, logits, rtol=1e-4, atol=1e-5)
    else:
      assert not np.allclose(logits_scaled, logits, atol=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logit_softcap_is_cap_times_tanh_of_the_plain_logits(family):
  cfg = tiny_config(family)
  params, tokens = init_params(cfg), random_tokens((2, LENGTH))
  params["embed"] = params["embed"] * 30.0  # logits of tens, so the cap bites
  plain = np.asarray(forward(cfg)(params, tokens), np.float64)
  capped = np.asarray(forward(dataclasses.replace(cfg, logit_softcap=5.0))(params, tokens))
  assert np.abs(plain).max() > 10.0 and np.abs(capped).max() <= 5.0
  np.testing.assert_allclose(capped, 5.0 * np.tanh(plain / 5.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_relu2_mlp_matches_numpy(family):
  cfg = tiny_config(family, mlp_activation="relu2")
  x = np.random.default_rng(3).normal(size=(2, 5, cfg.d_model)).astype(np.float32)
  mlp = Mlp(cfg)
  params = jax.tree.map(lambda a: np.random.default_rng(4).normal(0, 0.2, a.shape).astype(np.float32),
                        nn.unbox(jax.eval_shape(mlp.init, jax.random.key(0), x)["params"]))
  got = np.asarray(mlp.apply({"params": params}, x))
  x64 = x.astype(np.float64)
  p = {k: v.astype(np.float64) for k, v in params.items()}
  if family == "llama":
    expected = (np.maximum(x64 @ p["gate"], 0) ** 2 * (x64 @ p["up"])) @ p["down"]
  else:
    expected = np.maximum(x64 @ p["fc"] + p["fc_bias"], 0) ** 2 @ p["proj"] + p["proj_bias"]
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
