"""LoRA: an untrained adapter changes nothing, merging matches the adapted model, a step trains adapters only, and a
fine-tuned workdir loads merged and refuses a base model that is not its own."""

import dataclasses
import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import safetensors.numpy
from conftest import raises_one_line
from conftest import sft_config

from llm_jax import batch as batch_lib
from llm_jax import checkpoint as checkpoint_lib
from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import lora
from llm_jax import sharding
from llm_jax import steps as steps_lib
from llm_jax import trainer
from llm_jax import workdir as workdir_lib
from llm_jax.hf import files as hf_files
from llm_jax.model import Transformer
from llm_jax.model_config import ModelConfig

ALL_TARGETS = "q,k,v,o,mlp_in,mlp_out"


def _cfg(family: str, **lora_fields) -> ModelConfig:
  return ModelConfig(family=family, vocab_size=64, num_layers=2, d_model=32, num_heads=4,
                     num_kv_heads=2 if family == "llama" else 4, head_dim=8, d_ff=64, max_len=16, **lora_fields)


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: ModelConfig, key: jax.Array):
  return nn.unbox(Transformer(cfg).init(key, np.zeros((1, 16), np.int32))["params"])


def _params(cfg: ModelConfig, seed: int):
  return jax.device_get(_init(cfg, jax.random.key(seed)))


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens):
  return Transformer(cfg).apply({"params": params}, tokens)[0]


def _logits(cfg, params, tokens):
  return np.asarray(_forward(cfg, params, tokens))


TOKENS = np.random.default_rng(0).integers(0, 64, (2, 16))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_zero_initialised_b_gives_the_base_models_logits_exactly(family):
  base_cfg, lora_cfg = _cfg(family), _cfg(family, lora_rank=4, lora_targets=ALL_TARGETS)
  base = _params(base_cfg, 0)
  _, adapters = lora.split(_params(lora_cfg, 1))
  assert all(float(np.abs(b).max()) == 0 for path, b in jax.tree_util.tree_leaves_with_path(adapters)
             if str(path[-1].key).endswith("_lora_b"))
  np.testing.assert_array_equal(_logits(lora_cfg, lora.combine(base, adapters), TOKENS),
                                _logits(base_cfg, base, TOKENS))


@pytest.mark.parametrize("family, scan", [("gpt2", True), ("llama", False)])
def test_merged_and_unmerged_logits_agree(family, scan):
  lora_cfg = _cfg(family, lora_rank=4, lora_targets=ALL_TARGETS, scan_layers=scan)
  rng = np.random.default_rng(1)
  base, adapters = lora.split(_params(lora_cfg, 0))
  adapters = jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32), adapters)
  params = lora.combine(base, adapters)
  merged_cfg, merged = workdir_lib.merge_adapters(lora_cfg, params)
  assert merged_cfg == dataclasses.replace(lora_cfg, lora_rank=0, lora_targets="q,v")
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  unmerged_logits = _logits(lora_cfg, params, TOKENS)
  np.testing.assert_allclose(_logits(merged_cfg, merged, TOKENS), unmerged_logits, atol=1e-5)
  assert not np.allclose(_logits(merged_cfg, base, TOKENS), unmerged_logits, atol=1e-3)  # the adapters mattered


def test_targets_that_match_no_projection_are_refused():
  assert lora.parse_targets("q,mlp_in") == ("query", "fc", "gate", "up")
  with raises_one_line(errors.ConfigError, "model.lora_targets='q,qkv'", "qkv matches no projection"):
    lora.parse_targets("q,qkv")


def test_a_lora_step_changes_only_adapters_and_keeps_optimizer_state_for_them_alone():
  cfg = _cfg("gpt2", lora_rank=4, lora_targets="q,v,mlp_out")
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  tx = optax.adamw(1e-2)
  with jax.set_mesh(mesh):
    fns = steps_lib.build_steps(cfg, tx, optax.constant_schedule(1e-2), mesh, seed=0, seq_len=16, accum=1)
    base = jax.device_put(lora.split(_params(cfg, 3))[0], fns.base_shardings)
    fns = fns.with_base(base)
    state = fns.init()
    before_base, before_adapters = jax.device_get(base), jax.device_get(state.params)
    batch = sharding.global_batch(batch_lib.synthetic(4, 16, cfg.vocab_size), fns.batch_sharding)
    for _ in range(2):  # the second step moves A too (its gradient is zero while B is)
      state, _ = fns.train(state, batch)
  adapter_size = sum(x.size for x in jax.tree.leaves(before_adapters))
  assert adapter_size == 2 * 4 * (32 + 4 * 8 + 32 + 4 * 8 + 64 + 32)  # (q, v, proj) x (A + B) x 2 layers
  assert jax.tree.structure(state.params) == jax.tree.structure(before_adapters)
  assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                        jax.tree.leaves(before_adapters)))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(fns.base), before_base)
  moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  assert sum(x.size for x in moments) == 2 * adapter_size  # Adam's mu and nu, of adapters only


@pytest.mark.slow
def test_lora_fine_tune_checkpoints_adapters_and_loads_merged(pretrained, sft_rows, tmp_path):
  workdir = str(tmp_path / "lora")
  adapters = sft_config(pretrained, sft_rows, **{"model.lora_rank": 4, "num_train_steps": 6, "eval_every": 6,
                                                  "checkpoint_every": 6})
  trainer.train_and_evaluate(config_lib.resolve(adapters), workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir), async_save=False)
  try:
    meta = ckpt.restore_meta(6)
  finally:
    ckpt.close()
  assert meta["lora_base"] == workdir_lib.lora_base_reference(pretrained, 10)
  base, loaded = workdir_lib.load_model(pretrained), workdir_lib.load_model(workdir)
  assert loaded.cfg == base.cfg and jax.tree.structure(loaded.params) == jax.tree.structure(base.params)
  changed = {jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(loaded.params),
                                                           jax.tree.leaves(base.params)) if not np.array_equal(a, b)}
  assert changed == {"['layers']['attn']['query']", "['layers']['attn']['value']"}  # the default targets, q and v
  hf_files.export_hf(workdir, str(tmp_path / "hf"))  # convert --to_hf writes the merged weights
  exported = safetensors.numpy.load_file(str(tmp_path / "hf" / hf_files.HF_WEIGHTS_FILE))
  assert not any("lora" in name for name in exported)

  other = tmp_path / "other_base"
  shutil.copytree(pretrained, other, ignore=shutil.ignore_patterns(".lock"))
  with raises_one_line(errors.RunError, workdir, f"workdir: {os.path.abspath(pretrained)!r} vs {str(other)!r}",
                       f"--config.init_params_from={os.path.abspath(pretrained)}"):
    adapters = sft_config(str(other), sft_rows, **{"model.lora_rank": 4, "num_train_steps": 8})
    trainer.train_and_evaluate(config_lib.resolve(adapters), workdir)
  # The base named in the model card changed since the adapters were trained on it.
  card = json.loads((tmp_path / "lora" / "model.json").read_text())
  card["lora_base"]["workdir"] = str(other)
  (tmp_path / "lora" / "model.json").write_text(json.dumps(card))
  (other / "model.json").write_text((other / "model.json").read_text() + "\n")
  with raises_one_line(errors.RunError, workdir, "model_sha256: ") as error:
    workdir_lib.load_model(workdir)
  assert "workdir: " not in str(error.value)  # only the model card differs
