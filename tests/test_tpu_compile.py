"""Compiling the real train step for named TPU slices through libtpu on a CPU machine (llm_jax.tpu, dryrun, roofline).

The slow tests compile for v5e, v5p, v6e and v4 slices; the fast ones check slice names, the FLOP and collective
readers against formulas and CPU programs, the roofline arithmetic and the refusals.
"""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from conftest import raises_one_line
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax import config as config_lib
from llm_jax import dryrun
from llm_jax import errors
from llm_jax import planner
from llm_jax import roofline
from llm_jax import sharding
from llm_jax import steps as steps_lib
from llm_jax import target
from llm_jax import tpu
from llm_jax import trainer

sys.path.insert(0, os.path.join(REPO, "experiments"))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed "
                                  "(pip install -e .[tpu]); the suite's requirements-test.txt installs it")


@pytest.mark.parametrize("name,chips,shape", [
    ("v5p-8", 4, (2, 2, 1)), ("v5p-16", 8, (2, 2, 2)), ("v5p-64", 32, (2, 4, 4)), ("v5p-128", 64, (4, 4, 4)),
    ("v5p-256", 128, (4, 4, 8)), ("v4-8", 4, (2, 2, 1)), ("v5litepod-16", 16, (4, 4)), ("v5e-8", 8, (2, 4)),
    ("v6e-8", 8, (2, 4)), ("v6e-256", 256, (16, 16)), ("v5e-1", 1, (1, 1))])
def test_gcloud_names_give_googles_slice_shapes(name, chips, shape):
  # The shapes are the tables of docs.cloud.google.com/tpu/docs/v5p, v5e and v6e (v4/v5p count TensorCores).
  s = tpu.parse_slice(name)
  assert (s.chips, s.shape) == (chips, shape)


# Each names the slice given and, where one exists, the computed fix: the next valid size, the step sizes come in.
@pytest.mark.parametrize("name,fragments", [("v5p-12", ("v5p-16",)), ("v7x-8", ("v7x",)),
                                            ("v5p-9", ("multiple of 2",)), ("tpu-v5", ())])
def test_bad_slice_names_are_one_line_errors(name, fragments):
  with raises_one_line(tpu.TopologyError, repr(name), *fragments):
    tpu.parse_slice(name)


def test_topology_without_libtpu_says_how_to_install(monkeypatch):
  c = config_lib.from_file(os.path.join(REPO, "experiments", "smoke.py"))
  c.dry_run, c.topology = True, "v5e-8"
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
  with raises_one_line(errors.ConfigError, "topology='v5e-8' needs libtpu", "pip install -e .[tpu]"):
    config_lib.check(c)


def test_topology_outside_the_dry_run_is_refused():
  c = config_lib.from_file(os.path.join(REPO, "experiments", "smoke.py"))
  c.topology = "v5e-8"
  with raises_one_line(errors.ConfigError, "topology='v5e-8'", "dry_run"):
    config_lib.check(c)


def test_dot_flops_count_every_loop_trip():
  def f(w_LxDxD, x_BxD):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x_BxD, w_LxDxD)[0]

  text = jax.jit(f).lower(jnp.zeros((5, 32, 32)), jnp.zeros((8, 32))).as_text()
  one = 2 * 8 * 32 * 32
  assert roofline.dot_flops(text) == 5 * one
  assert roofline.dot_flops(text, trip_count=False) == one


def test_collectives_count_each_loop_trip():
  mesh = sharding.make_mesh((8, 1, 1))

  def f(x_NxD):
    def body(carry, _):
      return jnp.tanh(jnp.sum(x_NxD * carry, axis=0)), None  # rows sharded over data: an all-reduce per trip
    return jax.lax.scan(body, jnp.ones(x_NxD.shape[1]), None, length=3)[0]

  x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  compiled = jax.jit(f, out_shardings=NamedSharding(mesh, P())).lower(x).compile()
  found = roofline.collectives(compiled.as_text(), 8)
  assert found["all-reduce"].count == 3
  assert found["all-reduce"].bytes == 3 * 128 * 4
  assert found["all-reduce"].moved_bytes == pytest.approx(3 * 2 * 128 * 4 * 7 / 8)


def test_roofline_terms_and_mfu_by_hand():
  chip = tpu.CHIPS["v5e"]
  est = roofline.estimate(chip, flops_per_chip=197e12 * 0.5, hbm_bytes_per_chip=819e9 * 0.2,
                          ici_moved_bytes=100e9 * 0.7)
  assert (est.compute_s, est.hbm_s, est.ici_s) == pytest.approx((0.5, 0.2, 0.7))
  assert est.bound == "ICI collectives" and est.step_s == pytest.approx(0.7)
  assert roofline.mfu(197e12 * 8 * 0.35, 8, chip, 0.7) == pytest.approx(0.5)


def test_fit_advice_splits_the_batch_that_overflows():
  message = ("Ran out of memory on HBM, the total memory required for HLO temporaries (40.00G) exceeds available HBM "
             "(15.75G)")
  advice = dryrun.fit_advice(message, state_bytes=2 * dryrun.GIB, rows_per_device=64, accum=1, global_batch_size=512,
                             data_parallel=8, remat="none")
  # 13.75 GiB left after the state holds 64 * 13.75 / 40 = 22 rows: 4 micro-batches of 16.
  assert "grad_accum_steps=4" in advice and "global_batch_size=176" in advice and "remat_policy=full" in advice
  # Not one row fits beside 12 GiB of state: spread over (12 + 40 / 1) / 15.75 -> 4x the chips.
  advice = dryrun.fit_advice(message, state_bytes=12 * dryrun.GIB, rows_per_device=1, accum=1, global_batch_size=8,
                             data_parallel=8, remat="dots")
  assert "4x the chips" in advice and "grad_accum_steps" not in advice


def test_several_slices_must_match_the_devices():
  with raises_one_line(errors.MeshError, "num_slices=2", "1 slice"):
    sharding.make_mesh((-1, 1, 1), num_slices=2)


def _dry_run(spec: str, topology: str, **overrides):
  c = config_lib.from_file(os.path.join(REPO, "experiments", spec)) if ".py" in spec else _bench(spec)
  c.dry_run, c.topology = True, topology
  for key, value in overrides.items():
    section, _, field = key.rpartition("__")
    (c[section] if section else c)[field] = value
  return trainer.dry_run(config_lib.resolve(c))


def _bench(name: str):
  from llm_jax import bench  # pylint: disable=import-outside-toplevel
  return bench.bench_config(name)


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("spec,topology,kind", [("smoke.py", "v5e-8", "TPU v5 lite"),
                                                ("sotu_small.py", "v5e-8", "TPU v5 lite"),
                                                ("smoke.py", "v6e-8", "TPU v6 lite"),
                                                ("smoke.py", "v4-8", "TPU v4")])
def test_experiment_steps_compile_for_tpu_slices(spec, topology, kind):
  r = _dry_run(spec, topology)
  assert r["device_kind"] == kind and r["devices"] == tpu.parse_slice(topology).chips
  assert 0 < r["peak_bytes"] < r["hbm_bytes"] and r["headroom_bytes"] == r["hbm_bytes"] - r["peak_bytes"]
  # The scanned layers' missing trips are added back: more than XLA's own count, near the model's FLOPs.
  assert r["flops_per_device"] > r["compiled_flops_per_device"]
  assert r["estimate"].step_s > 0 and 0 < r["estimated_mfu"] < 1
  assert r["collectives"]  # a sharded step communicates


def _llama_1b_widths_count(num_layers: int) -> tuple[int, int]:
  """(parameters, of which norm scales) of llama_1b's widths (d 2048, 32 heads of 64, 8 KV heads, MLP 8192,
  vocabulary 32,000, tied) at `num_layers`: counted from the architecture, not from the model code."""
  d, heads, kv, k, f, v = 2048, 32, 8, 64, 8192, 32000
  per_layer = d * heads * k * 2 + d * kv * k * 2 + 3 * d * f
  norms = (2 * num_layers + 1) * d
  return num_layers * per_layer + v * d + norms, norms


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("fsdp,tensor", [(8, 1), (4, 2)])
def test_llama_1b_widths_on_v5p_16_hold_the_hand_counted_bytes(fsdp, tensor):
  r = _dry_run("llama_1b", "v5p-16", model__num_layers=2, data__seq_len=128, mesh__data=1, mesh__fsdp=fsdp,
               mesh__tensor=tensor)
  total, norms = _llama_1b_widths_count(2)
  # float32 parameters: matrices split over all 8 chips; norm scales ('embed' only) over fsdp, copied over tensor.
  assert r["params_bytes_per_device"] == 4 * ((total - norms) // 8 + norms // fsdp)
  assert r["device_kind"] == "TPU v5" and r["mesh"] == {"data": 1, "fsdp": fsdp, "tensor": tensor}


@pytest.mark.slow
@needs_libtpu
def test_a_batch_too_large_for_the_chip_is_refused_in_one_line():
  with pytest.raises(dryrun.DoesNotFit) as e:
    _dry_run("smoke.py", "v5e-8", global_batch_size=2**20, eval_batch_size=8)
  message = str(e.value)
  assert "\n" not in message and "v5e-8" in message and "grad_accum_steps=" in message


@pytest.mark.slow
@needs_libtpu
def test_two_v5e_16_slices_join_over_the_data_axis():
  c = config_lib.from_file(os.path.join(REPO, "experiments", "smoke.py"))
  c.dry_run, c.topology, c.num_slices = True, "v5e-16", 2
  c.mesh.data, c.mesh.fsdp, c.global_batch_size, c.eval_batch_size = 2, 16, 64, 32
  slice_ = tpu.parse_slice(c.topology, c.num_slices)
  mesh, run = trainer._mesh(config_lib.resolve(c), tpu.devices(slice_))  # pylint: disable=protected-access
  with target.compiling_for("tpu"), jax.set_mesh(mesh):
    fns = steps_lib.build(*run.with_vocab(512).step_records(), mesh)
    compiled = fns.lower_train(64, c.data.seq_len).compile()
  state_sh, batch_sh = compiled.input_shardings[0][:2]

  def slices_holding(sharding_, shape):
    """For each distinct shard (by its index), the slices of the devices that hold it."""
    held = {}
    for device, index in sharding_.devices_indices_map(shape).items():
      held.setdefault(str(index), set()).add(device.slice_index)
    return held

  # Each slice holds half the batch's rows; every parameter shard is held in both slices (fsdp stays in a slice).
  rows = slices_holding(batch_sh["inputs"], (64, c.data.seq_len))
  assert all(len(s) == 1 for s in rows.values()) and {min(s) for s in rows.values()} == {0, 1}
  embed = slices_holding(state_sh.params["embed"], (512, 64))
  assert len(embed) == 16 and all(s == {0, 1} for s in embed.values())
  assert np.all(np.vectorize(lambda d: d.slice_index)(mesh.devices)[1] == 1)


@pytest.mark.parametrize("name,chips,slices,shape", [("fsdp", 8, 1, (1, 8, 1)), ("fsdp_tensor2", 8, 1, (1, 4, 2)),
                                                     ("data", 8, 1, (8, 1, 1)), ("fsdp", 32, 2, (2, 16, 1))])
def test_planner_mesh_splits(name, chips, slices, shape):
  assert planner.mesh_shape(name, chips, slices) == shape


def test_the_planner_refuses_a_run_without_a_slice():
  run = config_lib.check(config_lib.from_file(os.path.join(REPO, "experiments", "smoke.py")))
  with raises_one_line(errors.ConfigError, "--config.topology=<slice>"):
    planner.plan(run)


def test_planner_refuses_an_unknown_mesh_split():
  with raises_one_line(errors.ConfigError, "'pipeline'", "fsdp_tensorN"):
    planner.mesh_shape("pipeline", 8, 1)


@pytest.mark.slow
@needs_libtpu
def test_planner_ranks_fitting_candidates_with_their_flags_and_reruns_from_its_cache(tmp_path):
  c = config_lib.from_file(os.path.join(REPO, "experiments", "smoke.py"))
  c.topology, c.plan = "v5e-8", True
  run = config_lib.resolve(c)
  rows = planner.plan(run, micro_batches=(1, 2), remats=("none",), meshes=("fsdp",), log=lambda line: None,
                      cache_dir=str(tmp_path))
  lines = []
  assert planner.plan(run, micro_batches=(1, 2), remats=("none",), meshes=("fsdp",), log=lines.append,
                      cache_dir=str(tmp_path)) == rows
  assert lines and all(line.endswith("(cached)") for line in lines)
  assert [r["fits"] for r in rows] == [True] * len(rows) and len(rows) >= 2
  assert [r["tokens_per_s"] for r in rows] == sorted((r["tokens_per_s"] for r in rows), reverse=True)
  best = rows[0]
  assert f"--config.global_batch_size={best['global_batch_size']}" in best["flags"]
  assert best["global_batch_size"] == best["micro_batch_per_chip"] * best["mesh"]["data"] * best["mesh"]["fsdp"]


def test_hbm_traffic_matches_xla_without_loops_and_counts_loop_trips():
  def f(w_LxDxD, x_BxD):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x_BxD, w_LxDxD)[0]

  def traffic(layers):
    compiled = jax.jit(f).lower(jnp.zeros((layers, 256, 256)), jnp.zeros((64, 256))).compile()
    return roofline.read_hlo(compiled.as_text(), 1).hbm_bytes, compiled.cost_analysis()["bytes accessed"]

  plain = jax.jit(lambda a, b: jnp.tanh(a @ b) + 1).lower(jnp.zeros((256, 256)), jnp.zeros((256, 256))).compile()
  ours, xla = roofline.read_hlo(plain.as_text(), 1).hbm_bytes, plain.cost_analysis()["bytes accessed"]
  assert 0.5 < ours / xla < 2
  (two, _), (six, _) = traffic(2), traffic(6)
  per_trip, weight = (six - two) / 4, 256 * 256 * 4
  # Each trip reads its own weight (the CPU copies the slice out first) and the carry: at least one weight's bytes,
  # and less than the whole stack of six, which counting the sliced operand whole would give.
  assert weight < per_trip < 6 * weight
