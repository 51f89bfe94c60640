"""Our train step against a second implementation in PyTorch (tools/torch_reference.py): same init, same
batches, the same losses before and after AdamW steps; and its schedule against optim.make_schedule."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO
from conftest import assert_cli_error

from llm_jax import batch as batch_lib
from llm_jax import config as config_lib
from llm_jax import loop as loop_lib
from llm_jax import optim
from llm_jax import sharding
from llm_jax import steps as steps_lib

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(REPO, "tools"))
import torch_reference  # noqa: E402  pylint: disable=wrong-import-position


def _config():
  c = config_lib.from_file(os.path.join(REPO, "experiments", "smoke.py"))
  c.model.vocab_size = 512
  c.num_train_steps = 6
  c.optim.warmup_steps = 2  # five steps cover the warm-up and the cosine, weight decay included
  return c


def _packed_batch(seed: int, b: int = 8, l: int = 64) -> dict[str, np.ndarray]:
  """Two documents per row of different lengths, the last target of each left out of the loss; each target is a
  fixed function of its input, so a few steps visibly lower the loss."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, 512, (b, l))
  cut = rng.integers(8, l - 8, size=(b, 1))
  slot = np.arange(l)[None, :]
  second = slot >= cut
  positions = np.where(second, slot - cut, slot)
  mask = np.ones((b, l))
  mask[np.arange(b), cut[:, 0] - 1] = 0.0
  mask[:, -1] = 0.0
  return batch_lib.make(inputs=inputs, targets=(7 * inputs + 3) % 512,
                        segment_ids=1 + second, positions=positions, loss_mask=mask)


def test_torch_reference_matches_our_losses_through_adamw_steps():
  c = _config()
  mesh = sharding.make_mesh((-1, 1, 1))
  with jax.set_mesh(mesh):
    cfg, optim_cfg, step_cfg = config_lib.resolve(c).with_vocab(512).step_records()
    fns = steps_lib.build(cfg, optim_cfg, step_cfg, mesh)
    state = fns.init()
    ref = torch_reference.TorchTrainer(cfg, optim_cfg, c.num_train_steps, jax.device_get(state.params))
    ours, theirs = [], []
    for i in range(5):
      batch = _packed_batch(i)
      state, m = fns.train(state, sharding.global_batch(batch, fns.batch_sharding))
      ours.append(float(m["loss"]))
      theirs.append(float(ref.step(torch_reference.to_torch(batch))))
    eval_batches = [_packed_batch(100 + i) for i in range(2)]
    our_val = loop_lib.evaluate(fns, state.params, eval_batches)["val_loss"]
  their_val = ref.evaluate([torch_reference.to_torch(b) for b in eval_batches])
  assert abs(ours[0] - theirs[0]) < 1e-5, (ours[0], theirs[0])  # identical init, one forward
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
  assert ours[-1] < ours[0] - 0.05  # the steps did change the parameters, so the agreement says something
  assert abs(our_val - their_val) < 1e-4, (our_val, their_val)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_torch_reference_schedule_matches_optim(schedule):
  o = optim.OptimConfig(name="adamw", schedule=schedule, learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
  ours = optim.make_schedule(o, 100)
  for step in (0, 1, 5, 10, 11, 50, 99, 100, 120):
    assert torch_reference.learning_rate(o, 100, step) == pytest.approx(float(ours(step)), rel=1e-6, abs=1e-12)


def test_torch_reference_refuses_other_families():
  c = _config()
  c.model.family = "llama"
  with pytest.raises(ValueError, match="gpt2"):
    torch_reference.TorchGPT(config_lib.resolve(c).model.with_vocab(512))


@pytest.mark.slow
def test_compare_torch_end_to_end_writes_both_curves(tmp_path):
  out = tmp_path / "compare.json"
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "compare_torch.py"), "--configs=smoke",
                           "--warmup=1", "--steps=1", "--repeats=2", "--eval_batches=2", f"--json={out}",
                           f"--workdir={tmp_path / 'work'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads(out.read_text())["results"][0]
  assert r["config"] == "smoke" and r["steps"] == 3 and r["global_batch_size"] == 8 and r["seq_len"] == 64
  for side in ("ours", "torch"):
    assert len(r[side]["ms_per_step_blocks"]) == 2  # the warm-up step is left out of the timed blocks
    assert r[side]["tokens_per_s_min"] <= r[side]["tokens_per_s_median"] <= r[side]["tokens_per_s_max"]
    assert r[side]["tokens_per_s_median"] == pytest.approx(8 * 64 / (r[side]["ms_per_step_median"] / 1000))
  assert r["ours_over_torch_tokens_per_s"] == pytest.approx(
      r["ours"]["tokens_per_s_median"] / r["torch"]["tokens_per_s_median"])
  assert len(r["loss_ours"]) == len(r["loss_torch"]) == 3
  assert abs(r["loss_ours"][0] - r["loss_torch"][0]) < 1e-5  # same init, same first batch
  assert r["max_abs_loss_diff"] < 1e-3
  assert abs(r["val_loss_ours"] - r["val_loss_torch"]) < 1e-3
  assert r["torch_threads"] == os.cpu_count()
  assert "[smoke]" in result.stdout and "validation loss" in result.stdout


@pytest.mark.slow
def test_compare_torch_refuses_cpu_threads_for_a_cuda_run(tmp_path):
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "compare_torch.py"), "--configs=smoke",
                           "--device=cuda", "--torch_threads=2", f"--workdir={tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
  assert_cli_error(result, "compare_torch", "--torch_threads", "--device=cpu")
  assert not any(tmp_path.iterdir())  # refused before any data was prepared
