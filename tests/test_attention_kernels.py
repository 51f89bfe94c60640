"""The fused attention kernels (llm_jax.attention_kernels) against the einsum attention: splash run in interpret mode
on CPU, alone and inside the sharded model; the 'auto' resolution; the one-line refusals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import raises_one_line

from llm_jax import attention_kernels as kernels
from llm_jax import errors
from llm_jax import sharding
from llm_jax import steps as steps_lib
from llm_jax.attention import attention_mask
from llm_jax.attention import dot_product_attention
from llm_jax.model_config import ModelConfig


def _reference(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL):
  """The model's XLA attention (one block) with its dense causal and same-document mask."""
  b, l = q_BxLxHxK.shape[:2]
  pos_BxL = jnp.broadcast_to(jnp.arange(l), (b, l))
  mask_BxLxS = attention_mask(pos_BxL, pos_BxL, segment_ids_BxL, segment_ids_BxL)
  return dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxLxS)


def _documents(lengths):
  return jnp.asarray(np.repeat(np.arange(1, len(lengths) + 1), lengths)[None], jnp.int32)


# (length, query heads, KV heads, documents per row or None, block): each case one property, kept to one or two
# blocks so that the interpreted kernel runs in seconds.
CASES = {
    "causal": (128, 2, 2, None, None),
    "packed": (128, 2, 2, (60, 1, 67), None),
    "gqa": (128, 4, 1, None, None),
    "ragged_length": (200, 2, 1, (150, 50), 128),  # two blocks of 128, padded by 56
}


@pytest.mark.parametrize("case", CASES)
def test_splash_matches_the_reference_in_output_and_gradients(case):
  length, h, g, docs, block = CASES[case]
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, length, n, 32)), jnp.float32) for n in (h, g, g))
  segments = None if docs is None else _documents(docs)
  probe = jnp.asarray(rng.normal(size=(1, length, h, 32)), jnp.float32)

  def loss(attend):
    return lambda q, k, v: jnp.sum(attend(q, k, v, segments) * probe)

  splash = lambda *a: kernels.splash_attention(*a, block=block, interpret=True)  # noqa: E731
  out, grads = jax.jit(jax.value_and_grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
  ref_out, ref_grads = jax.jit(jax.value_and_grad(loss(_reference), argnums=(0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(jax.jit(splash)(q, k, v, segments), _reference(q, k, v, segments), atol=1e-5)
  assert float(out) == pytest.approx(float(ref_out), abs=1e-4)
  for name, got, want in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"d{name}")


def test_the_block_rule():
  assert [kernels.splash_block(n) for n in (16, 128, 200, 512, 2048, 8192)] == [128, 128, 256, 512, 512, 512]


def _loss_and_grads(impl: str, mesh_shape):
  cfg = ModelConfig(family="llama", vocab_size=64, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                    head_dim=16, d_ff=128, max_len=32, attention_impl=impl)
  rng = np.random.default_rng(0)
  b, l = 2, 32
  segments = np.repeat([1, 2, 3], [12, 1, 19])[None].repeat(b, 0).astype(np.int32)
  positions = np.concatenate([np.arange(12), np.arange(1), np.arange(19)])[None].repeat(b, 0).astype(np.int32)
  batch = {"inputs": rng.integers(0, 64, (b, l)), "targets": rng.integers(0, 64, (b, l)), "segment_ids": segments,
           "positions": positions, "loss_mask": np.ones((b, l), np.float32)}
  batch = {k: np.asarray(x, np.float32 if k == "loss_mask" else np.int32) for k, x in batch.items()}
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  tx = optax.sgd(1.0)
  with jax.set_mesh(mesh):
    fns = steps_lib.build_steps(cfg, tx, lambda step: 1.0, mesh, seed=0, seq_len=l, accum=1)
    state = fns.init()
    before = jax.device_get(state.params)
    state, metrics = fns.train(state, batch)
    grads = jax.tree.map(lambda a, c: a - c, before, jax.device_get(state.params))
  return float(metrics["loss"]), grads


@pytest.mark.slow  # two train-step compiles, one with the interpreted kernel: about 25 s
def test_the_models_loss_with_splash_equals_the_einsum_paths_on_a_sharded_mesh():
  # data=2, tensor=2: the batch and the heads (2 KV heads, 4 query heads) split, so shard_map hands each kernel
  # one row pair and one KV group.
  loss, grads = _loss_and_grads("splash", (2, 1, 2))
  ref_loss, ref_grads = _loss_and_grads("einsum", (2, 1, 2))
  assert abs(loss - ref_loss) <= 1e-5
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("backend, expected", [("tpu", "splash"), ("gpu", "cudnn"), ("cpu", "einsum")])
def test_auto_resolves_per_backend_and_an_explicit_impl_stays(backend, expected):
  assert kernels.resolve_attention_impl("auto", backend) == expected
  assert kernels.resolve_attention_impl("einsum", backend) == "einsum"


GOOD = {"compute_dtype": "bfloat16", "head_dim": 64, "seq_len": 2048}


@pytest.mark.parametrize("impl, backend, overrides, words", [
    ("auto", "gpu", {"compute_dtype": "float32"}, ("compute_dtype", "bfloat16")),
    ("cudnn", "gpu", {"head_dim": 60}, ("head_dim", "multiple of 8")),
    ("cudnn", "gpu", {"head_dim": 512}, ("head_dim", "256")),
    ("cudnn", "gpu", {"head_dim": 192, "gpu_capability": "8.0"}, ("head_dim", "128")),
    ("cudnn", "gpu", {"seq_len": 2047}, ("seq_len", "even")),
    ("cudnn", "tpu", {}, ("GPU only",)),
    ("splash", "gpu", {}, ("TPU kernel",)),
])
def test_a_kernel_that_cannot_run_is_refused_in_one_line(impl, backend, overrides, words):
  with raises_one_line(errors.ConfigError, f"model.attention_impl={impl!r}", *words):
    kernels.check_attention_impl(impl, backend, **{**GOOD, **overrides})


@pytest.mark.parametrize("impl, backend", [("auto", "gpu"), ("cudnn", "gpu"), ("auto", "tpu"), ("splash", "cpu"),
                                           ("auto", "cpu"), ("einsum", "gpu")])
def test_a_kernel_that_can_run_passes_the_check(impl, backend):
  kernels.check_attention_impl(impl, backend, **GOOD)


def test_decoding_with_a_kernel_impl_runs_the_xla_attention_over_the_cache():
  # The cache path must not reach the kernel: a splash config decodes exactly as an einsum config does.
  from llm_jax.model import Transformer  # pylint: disable=import-outside-toplevel
  from llm_jax.model import init_cache  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig(family="llama", vocab_size=64, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1,
                    head_dim=16, d_ff=64, max_len=8)
  params = Transformer(dataclasses.replace(cfg, attention_impl="einsum")).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  tokens, positions = jnp.asarray([[5]]), jnp.asarray([[0]])
  outs = [Transformer(dataclasses.replace(cfg, attention_impl=impl)).apply(
      {"params": params}, tokens, positions, None, init_cache(cfg, 1, 8))[0] for impl in ("einsum", "splash")]
  np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.slow
def test_the_train_step_with_splash_compiles_for_a_tpu_slice():
  # Through libtpu on this CPU host (requirements-test.txt): the splash kernel must sit in shard_map for Mosaic to
  # accept it, and 'auto' must resolve to it from the mesh's TPU devices, not from the CPU backend tracing it.
  import os  # pylint: disable=import-outside-toplevel
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # libtpu compiles only: no metadata server to ask
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold libtpu too
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
  texts = {}
  for impl in ("auto", "einsum"):
    cfg = ModelConfig(family="llama", vocab_size=256, num_layers=2, d_model=256, num_heads=4, num_kv_heads=2,
                      head_dim=64, d_ff=512, max_len=1024, compute_dtype="bfloat16", remat_policy="dots",
                      attention_impl=impl)
    mesh = sharding.make_mesh((2, 1, 2), devices)
    with jax.set_mesh(mesh):
      fns = steps_lib.build_steps(cfg, optax.adamw(1e-3), lambda step: 1e-3, mesh, seed=0, seq_len=1024, accum=1)
      compiled = fns.lower_train(4, 1024).compile()
    texts[impl] = compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
  assert "tpu_custom_call" in texts["auto"] and "tpu_custom_call" not in texts["einsum"]


def test_the_config_check_refuses_a_kernel_this_backend_cannot_run_before_anything_compiles():
  from llm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.get_config()
  run = config_lib.check(c).on_devices({"data": 1, "fsdp": 1, "tensor": 1}, "cpu")
  assert run.platform.attention_impl == "einsum"  # 'auto' on CPU: the einsum attention
  c.model.attention_impl = "cudnn"
  with raises_one_line(errors.ConfigError, "model.attention_impl='cudnn'", "cpu"):
    config_lib.check(c).on_devices({"data": 1, "fsdp": 1, "tensor": 1}, "cpu")
