"""Sharded steps agree with one device on every mesh; placements follow the rule table."""

import jax
import numpy as np
import optax
import pytest
from conftest import raises_one_line
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import optim
from llm_jax import sharding
from llm_jax import steps as steps_lib

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 1, 1)]
VOCAB, SEQ, BATCH = 128, 16, 16


def _config(family: str):
  c = config_lib.get_config()
  c.model.update({"family": family, "num_layers": 2, "d_model": 64, "num_heads": 16, "head_dim": 8,
                  "num_kv_heads": 8 if family == "llama" else 0})
  c.data.seq_len = c.sample.max_length = SEQ
  # SGD with lr 1: the parameter change after one step *is* minus the gradient (momentum's trace starts at 0).
  c.optim.update({"name": "sgd", "learning_rate": 1.0, "schedule": "constant", "warmup_steps": 0,
                  "weight_decay": 0.0, "grad_clip_norm": 0.0})
  return c


def _batch():
  rng = np.random.default_rng(0)
  segments = np.where(np.arange(SEQ) < SEQ // 2, 1, 2).astype(np.int32)
  return {"inputs": rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32),
          "targets": rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32),
          "segment_ids": np.tile(segments, (BATCH, 1)),
          "positions": np.tile(np.arange(SEQ, dtype=np.int32) % (SEQ // 2), (BATCH, 1)),
          "loss_mask": (rng.random((BATCH, SEQ)) > 0.1).astype(np.float32)}


def _one_step(c, mesh_shape, accum=1):
  cfg = config_lib.resolve(c).model.with_vocab(VOCAB)
  tx, schedule = optim.make_optimizer(config_lib.resolve(c).optim, 10)
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  with jax.set_mesh(mesh):
    fns = steps_lib.build_steps(cfg, tx, schedule, mesh, seed=0, seq_len=SEQ, accum=accum)
    state = fns.init()
    before = jax.device_get(state.params)
    state, m = fns.train(state, _batch())
    grads = jax.tree.map(lambda a, b: a - b, before, jax.device_get(state.params))
    return float(m["loss"]), grads


# Llama (grouped-query attention) on each axis alone at degree 8 and on all three at once. GPT-2 shares its
# matrices' layouts, so it runs the two meshes that shard what only it has (head and MLP biases split over
# 'tensor', the position table and LayerNorm biases split along the width over 'fsdp'): a mesh is a ~7 s compile.
@pytest.mark.slow
@pytest.mark.parametrize("family,meshes", [("gpt2", [(1, 1, 8), (2, 2, 2)]), ("llama", MESHES[:-1])])
def test_loss_and_gradients_agree_across_meshes(family, meshes):
  c = _config(family)
  ref_loss, ref_grads = _one_step(c, (1, 1, 1))
  for shape in meshes:
    loss, grads = _one_step(c, shape)
    assert loss == pytest.approx(ref_loss, rel=1e-5), shape
    flat = np.concatenate([x.ravel() for x in jax.tree.leaves(grads)])
    ref_flat = np.concatenate([x.ravel() for x in jax.tree.leaves(ref_grads)])
    assert np.linalg.norm(flat - ref_flat) <= 1e-5 * np.linalg.norm(ref_flat), shape
    # Per parameter too, with a floor for gradients that are zero in exact arithmetic (key biases).
    floor = 1e-6 * np.abs(ref_flat).max()
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
      err = np.linalg.norm(g - r)
      assert err <= 1e-5 * np.linalg.norm(r) + floor, (shape, jax.tree_util.keystr(path), err)


def test_parameter_and_optimizer_shardings_follow_the_rules():
  c = _config("llama")
  c.optim.name = "adamw"
  cfg = config_lib.resolve(c).model.with_vocab(VOCAB)
  tx, schedule = optim.make_optimizer(config_lib.resolve(c).optim, 10)
  mesh = sharding.make_mesh((2, 2, 2))
  with jax.set_mesh(mesh):
    fns = steps_lib.build_steps(cfg, tx, schedule, mesh, seed=0, seq_len=SEQ, accum=1)
    state = fns.init()
  layers = state.params["layers"]
  assert layers["attn"]["query"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert layers["attn"]["out"].sharding.spec == P(None, "tensor", None, "fsdp")
  assert layers["mlp"]["down"].sharding.spec == P(None, "tensor", "fsdp")
  assert state.params["embed"].sharding.spec == P("tensor", "fsdp")
  assert layers["attn_norm"]["scale"].sharding.spec == P(None, "fsdp")
  for name in ("mu", "nu"):
    moments = optax.tree_utils.tree_get(state.opt_state, name)
    assert moments["layers"]["attn"]["query"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert not moments["embed"].sharding.is_fully_replicated
  abstract = fns.abstract_state.params
  assert sharding.replicated_fraction(abstract, fns.state_shardings.params) == 0.0


def _trained_params(c, mesh_shape, steps=2):
  cfg = config_lib.resolve(c).model.with_vocab(VOCAB)
  tx, schedule = optim.make_optimizer(config_lib.resolve(c).optim, 10)
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  with jax.set_mesh(mesh):
    fns = steps_lib.build_steps(cfg, tx, schedule, mesh, seed=0, seq_len=SEQ, accum=1)
    state = fns.init()
    for _ in range(steps):
      state, _ = fns.train(state, _batch())
    return jax.device_get(state.params)


def test_muon_steps_agree_across_meshes():
  c = _config("llama")
  c.optim.update({"name": "muon", "learning_rate": 0.02, "adam_learning_rate": 3e-3})
  reference = _trained_params(c, (1, 1, 1))
  for shape in [(2, 2, 2)]:  # data, fsdp and tensor at once: one compile, Newton-Schulz on sharded matrices
    params = _trained_params(c, shape)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(reference)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=f"{shape} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_state_is_sharded_like_its_parameters(name):
  c = _config("llama")
  c.optim.update({"name": name, "schedule": "constant" if name == "schedule_free_adamw" else "cosine"})
  if name == "sgd":
    c.optim.momentum = 0.9
  cfg = config_lib.resolve(c).model.with_vocab(VOCAB)
  tx, _ = optim.make_optimizer(config_lib.resolve(c).optim, 10)
  mesh = sharding.make_mesh((2, 2, 2))
  abstract, shardings, params_sh = steps_lib.state_shardings(cfg, tx, mesh, 0, SEQ)
  query_sh = params_sh["layers"]["attn"]["query"]
  state_leaves = jax.tree_util.tree_leaves_with_path(abstract.opt_state)
  sh_leaves = jax.tree.leaves(shardings.opt_state)
  # The trap: optimizer state left fully replicated. Every per-parameter moment must follow its parameter ...
  shadows = [(jax.tree_util.keystr(p), sh) for (p, x), sh in zip(state_leaves, sh_leaves)
             if jax.tree_util.keystr(p).endswith("['layers']['attn']['query']") and x.shape == (2, 64, 16, 8)]
  assert shadows and all(sh == query_sh for _, sh in shadows), shadows
  # ... so that what stays replicated (counts, scalars, Adafactor's factored statistics) is a sliver.
  total = sum(x.size for _, x in state_leaves)
  replicated_size = sum(x.size for (_, x), sh in zip(state_leaves, sh_leaves) if sh.is_fully_replicated)
  assert replicated_size <= 0.02 * total, (name, replicated_size, total)


def test_replicated_fraction_counts_bytes():
  c = _config("gpt2")
  cfg = config_lib.resolve(c).model.with_vocab(VOCAB)
  tx, _ = optim.make_optimizer(config_lib.resolve(c).optim, 10)
  mesh = sharding.make_mesh((8, 1, 1))
  abstract, shardings, params_sh = steps_lib.state_shardings(cfg, tx, mesh, 0, SEQ)
  # Pure data parallelism replicates everything.
  assert sharding.replicated_fraction(abstract.params, params_sh) == 1.0


@pytest.mark.parametrize("requested, fragments", [
    ((3, 1, 1), ("mesh.data=3, mesh.fsdp=1, mesh.tensor=1", "needs 3 devices but 8 are present")),
    ((-1, -1, 1), ("mesh.data=-1, mesh.fsdp=-1", "more than one -1")),
    ((-1, 3, 1), ("mesh.fsdp=3", "does not divide the 8 devices")),
    ((0, 8, 1), ("mesh.data=0", "must be positive")),
])
def test_impossible_meshes_are_refused(requested, fragments):
  with raises_one_line(errors.MeshError, *fragments):
    sharding.make_mesh(requested)


def test_dimension_that_does_not_divide_is_refused_before_compiling():
  c = _config("llama")
  c.model.num_kv_heads = 2  # 2 KV heads cannot be split over tensor=8
  cfg = config_lib.resolve(c).model.with_vocab(VOCAB)
  tx, schedule = optim.make_optimizer(config_lib.resolve(c).optim, 10)
  mesh = sharding.make_mesh((1, 1, 8))
  with raises_one_line(errors.MeshError, "dimension 2 that does not divide over mesh axes ('tensor',)", "mesh.tensor"):
    steps_lib.build_steps(cfg, tx, schedule, mesh, seed=0, seq_len=SEQ, accum=1)


def test_gradient_accumulation_equals_one_big_batch():
  c = _config("gpt2")
  loss_one, grads_one = _one_step(c, (2, 2, 2))
  loss_four, grads_four = _one_step(c, (2, 2, 2), accum=4)
  assert loss_four == pytest.approx(loss_one, rel=1e-5)
  for g, r in zip(jax.tree.leaves(grads_four), jax.tree.leaves(grads_one)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("accum, batch, seq_len, data_parallel, backend, expected", [
    (0, 64, 256, 1, "cpu", 4),  # 10m on one device: 4 micro-batches of 16 x 256 = 4,096 tokens
    (0, 64, 256, 2, "cpu", 2),  # 32 rows per device: 2 of 16 x 256
    (0, 12, 1024, 1, "cpu", 3),  # 3 of 4 x 1,024 (4 of 3 x 1,024 would be below 4,096)
    (0, 16, 128, 1, "cpu", 1),  # sotu_small: 2,048 tokens, too few to split
    (0, 12, 64, 1, "cpu", 1),  # tiny
    (0, 10, 4096, 4, "cpu", 1),  # rows that do not divide over the devices: left to validation's error
    (0, 64, 256, 1, "gpu", 1),  # unmeasured backends: one batch
    (0, 64, 256, 1, "tpu", 1),
    (3, 12, 64, 1, "cpu", 3),  # given: as given
    (2, 64, 256, 1, "gpu", 2),
])
def test_auto_micro_batches_keep_at_least_the_backends_token_count(accum, batch, seq_len, data_parallel, backend,
                                                                   expected):
  assert steps_lib.resolve_grad_accum_steps(accum, batch, seq_len, data_parallel, backend) == expected
  if not accum and expected > 1:  # the most micro-batches of at least that many tokens, and the rows split evenly
    rows = batch // data_parallel
    assert rows % expected == 0 and rows // expected * seq_len >= steps_lib.AUTO_MICRO_BATCH_TOKENS[backend]
    assert not any(rows % k == 0 and rows // k * seq_len >= steps_lib.AUTO_MICRO_BATCH_TOKENS[backend]
                   for k in range(expected + 1, rows + 1))


def test_the_trainer_builds_the_step_with_the_resolved_micro_batches(monkeypatch):
  monkeypatch.setitem(steps_lib.AUTO_MICRO_BATCH_TOKENS, "cpu", 4 * SEQ)  # 16 rows of 16 tokens: 4 micro-batches
  c = _config("gpt2")
  c.global_batch_size = BATCH
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  for given, runs in ((0, 4), (2, 2), (1, 1)):
    c.grad_accum_steps = given
    with jax.set_mesh(mesh):
      fns = steps_lib.build(*config_lib.resolve(c).with_vocab(VOCAB).step_records(), mesh)
    assert fns.accum == runs


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1), (1, 1, 8)])
def test_a_batch_splits_as_many_ways_as_data_parallel_size_says(shape):
  # One rule (the logical 'batch' axis) places host batches, the micro-batch constraint and the split count.
  mesh = sharding.make_mesh(shape, jax.devices()[:8])
  rows = 16
  ways = rows // sharding.batch_sharding(mesh).shard_shape((rows, 4))[0]
  assert ways == sharding.data_parallel_size(dict(mesh.shape)) == shape[0] * shape[1]
  micro = NamedSharding(mesh, sharding.batch_spec(leading=1))
  assert micro.shard_shape((2, rows, 4)) == (2, rows // ways, 4)
