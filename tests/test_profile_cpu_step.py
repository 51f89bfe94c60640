"""tools/profile_cpu_step.py's dot table: the FLOPs it assigns a traced dot match the matmul's formula."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import profile_cpu_step  # noqa: E402  pylint: disable=wrong-import-position


@pytest.mark.parametrize("options", [{}, {"xla_cpu_experimental_ynn_fusion_type": ""}], ids=["ynn", "plain_dots"])
def test_dot_table_finds_each_dot_with_its_shape_and_calls(tmp_path, options):
  def f(x_NxD, w_DxF, u_FxD):
    return jnp.tanh(x_NxD @ w_DxF) @ u_FxD

  args = (jnp.ones((64, 32)), jnp.ones((32, 48)), jnp.ones((48, 32)))
  compiled = jax.jit(f).lower(*args).compile(options)
  steps = 2
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(steps):
      jax.block_until_ready(compiled(*args))
  totals, calls = profile_cpu_step.op_times(str(tmp_path))
  rows = profile_cpu_step.dot_table(compiled.as_text(), totals, calls, steps)
  assert sorted((r["out"], r["k"], r["calls_per_step"]) for r in rows) == [([64, 32], 48, 1), ([64, 48], 32, 1)]
  for r in rows:  # 2·M·N·K per call
    assert r["gflop_per_s"] == pytest.approx(2 * r["out"][0] * r["out"][1] * r["k"] / r["ms_per_step"] / 1e6)
