"""steps.build, the one step builder: the same step as one assembled by hand from its parts, micro-batches 'auto'
resolved for the platform being compiled for, and the frozen records it takes resolved from an experiment config."""

import dataclasses

import jax
import numpy as np
from conftest import smoke_config

from llm_jax import batch as batch_lib
from llm_jax import config as config_lib
from llm_jax import optim
from llm_jax import sharding
from llm_jax import steps as steps_lib
from llm_jax import target

VOCAB = 128


def _mesh(n: int) -> jax.sharding.Mesh:
  return sharding.make_mesh((n, 1, 1), jax.devices()[:n])


def test_build_is_the_step_assembled_by_hand():
  c = smoke_config(num_train_steps=10, grad_accum_steps=1)
  cfg, optim_cfg, step_cfg = config_lib.resolve(c).with_vocab(VOCAB).step_records()
  host = batch_lib.synthetic(c.global_batch_size, c.data.seq_len, VOCAB)
  mesh = _mesh(2)
  results = []
  with jax.set_mesh(mesh):
    tx, schedule = optim.make_optimizer(optim_cfg, c.num_train_steps)
    by_hand = steps_lib.build_steps(cfg, tx, schedule, mesh, seed=c.seed, seq_len=c.data.seq_len, accum=1,
                                    z_loss=c.z_loss)
    for fns in (steps_lib.build(cfg, optim_cfg, step_cfg, mesh), by_hand):
      state, metrics = fns.train(fns.init(), sharding.global_batch(host, fns.batch_sharding))
      results.append((float(metrics["loss"]), jax.device_get(state.params)))
  assert results[0][0] == results[1][0]
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_array_equal(a, b)


def test_step_config_takes_each_key_from_the_experiment_config():
  c = smoke_config(seed=7, global_batch_size=24, num_train_steps=33, grad_accum_steps=3, z_loss=1e-4,
                   max_replicated_share=0.25)
  c.data.seq_len = 48
  assert config_lib.check(c).step == steps_lib.StepConfig(
      seed=7, seq_len=48, global_batch_size=24, num_train_steps=33, grad_accum_steps=3, z_loss=1e-4,
      max_replicated_share=0.25)


def test_auto_micro_batches_follow_the_platform_compiled_for():
  # 16 rows of 1,024 tokens on one data-parallel device: on CPU the most micro-batches that keep >= 4,096 tokens each
  # (AUTO_MICRO_BATCH_TOKENS) is 16 / 4 = 4; a TPU target is unmeasured, so one batch. A given count wins anywhere.
  c = smoke_config(global_batch_size=16, grad_accum_steps=0)
  c.data.seq_len = 1024
  cfg, optim_cfg, step_cfg = config_lib.resolve(c).with_vocab(VOCAB).step_records()
  mesh = _mesh(1)
  with jax.set_mesh(mesh):
    assert steps_lib.build(cfg, optim_cfg, step_cfg, mesh).accum == 4
    with target.compiling_for("tpu"):
      assert steps_lib.build(cfg, optim_cfg, step_cfg, mesh).accum == 1
      given = dataclasses.replace(step_cfg, grad_accum_steps=2)
      assert steps_lib.build(cfg, optim_cfg, given, mesh).accum == 2


def test_query_blocks_are_the_count_the_attention_runs():
  from llm_jax.attention import query_blocks  # pylint: disable=import-outside-toplevel
  assert query_blocks("einsum", "cpu", 64) == 2  # CPU's two blocks divide 64 positions
  assert query_blocks("einsum", "cpu", 63) == 1  # an odd length runs as one block
  assert query_blocks("jax", "cpu", 64) == 1  # XLA's attention is one block
  assert query_blocks("einsum", "tpu", 64) == 1  # unmeasured backends keep one block
  assert query_blocks("splash", "tpu", 64) == 0  # a fused kernel has no query blocks of ours
