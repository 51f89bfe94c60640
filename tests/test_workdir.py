"""llm_jax/workdir.py: the run config and model card round trips, data-store and pin records, the LoRA base
reference, every resume check (what it accepts, what it refuses and the key it names), merging adapters against a
merge done by hand, and load_model on a tiny workdir written here."""

import dataclasses
import hashlib
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import raises_one_line

from llm_jax import checkpoint as checkpoint_lib
from llm_jax import errors
from llm_jax import workdir as workdir_lib
from llm_jax.model import abstract_params
from llm_jax.model_config import ModelConfig
from llm_jax.tokenizer import train_tokenizer

TINY = ModelConfig(vocab_size=64, num_layers=2, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8, d_ff=32,
                   max_len=8)


def _random_params(cfg, seed):
  """Random float32 parameters of `cfg`'s shapes (no model init, no compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32), nn.unbox(abstract_params(cfg)))


# Paths, run config and model card.

def test_checkpoint_dir_is_absolute_for_a_local_workdir_and_a_url_stays_as_it_is(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert workdir_lib.checkpoint_dir("run") == os.path.join(str(tmp_path), "run", "checkpoints")
  assert workdir_lib.checkpoint_dir("gs://bucket/run") == "gs://bucket/run/checkpoints"
  assert workdir_lib.lock_path("run") == os.path.join("run", ".lock")


def test_run_config_round_trips_with_its_model_kept_in_the_model_card(tmp_path):
  c = {"seed": 3, "optim": {"name": "adamw", "learning_rate": 1e-3}, "tags": ["a", "b"],
       "model": dataclasses.asdict(TINY)}
  assert not workdir_lib.has_run_config(str(tmp_path))
  workdir_lib.write_run_config(str(tmp_path), c)
  workdir_lib.write_model_card(str(tmp_path), TINY, str(tmp_path / "tok.model"))
  assert workdir_lib.has_run_config(str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["model"] == "model.json"  # one record of the model
  assert workdir_lib.read_run_config(str(tmp_path)) == c
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["learning_rate"] == 1e-3


def test_read_run_config_of_a_folder_without_one_names_the_file(tmp_path):
  with raises_one_line(errors.MissingFileError, str(tmp_path / "config.json")):
    workdir_lib.read_run_config(str(tmp_path))


def test_model_card_round_trips_and_keeps_the_tokenizer_path_relative(tmp_path):
  cfg = dataclasses.replace(TINY, family="llama", rope_theta=500000.0, tie_embeddings=False)
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  workdir_lib.write_model_card(workdir, cfg, os.path.join(workdir, "tokenizer", "spm.model"))
  assert workdir_lib.read_model_card(workdir) == (cfg, os.path.join(workdir, "tokenizer", "spm.model"))
  assert json.loads((tmp_path / "run" / "model.json").read_text())["tokenizer"] == os.path.join("tokenizer",
                                                                                                  "spm.model")
  assert workdir_lib.read_lora_base(workdir) is None
  shutil.move(workdir, tmp_path / "moved")  # a relative tokenizer path follows the workdir
  assert workdir_lib.read_model_card(str(tmp_path / "moved"))[1] == str(tmp_path / "moved" / "tokenizer" / "spm.model")


def test_model_card_keeps_the_lora_base(tmp_path):
  base = {"workdir": "/runs/base", "step": 30, "model_sha256": "ab" * 32}
  workdir_lib.write_model_card(str(tmp_path), TINY, str(tmp_path / "t.model"), lora_base=base)
  assert workdir_lib.read_lora_base(str(tmp_path)) == base
  assert workdir_lib.read_model_card(str(tmp_path))[0] == TINY


def test_read_model_card_refusals_name_the_flag_and_the_file(tmp_path):
  with raises_one_line(errors.MissingFileError, f"--base={tmp_path / 'nowhere'}"):
    workdir_lib.read_model_card(str(tmp_path / "nowhere"), flag="--base")
  with raises_one_line(errors.MissingFileError, str(tmp_path / "model.json"), "--workdir"):
    workdir_lib.read_model_card(str(tmp_path))


def test_data_store_records_absolute_paths_and_fingerprints_in_order(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs("run")
  workdir_lib.write_data_store("run", ["stores/f00d", "/shared/stores/beef"])
  assert json.loads((tmp_path / "run" / "data_store.json").read_text()) == {"stores": [
      {"store": str(tmp_path / "stores" / "f00d"), "fingerprint": "f00d"},
      {"store": "/shared/stores/beef", "fingerprint": "beef"}]}


# Pins.

def test_pin_checkpoint_records_each_user_once_and_the_checkpointer_reads_the_steps(tmp_path):
  workdir = str(tmp_path)
  workdir_lib.pin_checkpoint(workdir, 30, "/runs/lora_a")
  workdir_lib.pin_checkpoint(workdir, np.int64(30), "/runs/lora_a")  # again: no duplicate
  workdir_lib.pin_checkpoint(workdir, 30, "/runs/lora_b")
  workdir_lib.pin_checkpoint(workdir, 10, "/runs/lora_a")
  pins_path = os.path.join(workdir, "pinned_checkpoints.json")
  assert json.loads(open(pins_path, encoding="utf-8").read()) == {
      "steps": {"30": ["/runs/lora_a", "/runs/lora_b"], "10": ["/runs/lora_a"]}}
  assert checkpoint_lib.read_pins(pins_path) == {10, 30}
  assert sorted(os.listdir(workdir)) == ["pinned_checkpoints.json"]  # no temporary file left behind


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]"])
def test_pin_checkpoint_that_cannot_be_recorded_warns_in_one_line_and_raises_nothing(tmp_path, capsys, content):
  workdir = str(tmp_path / ("missing" if content is None else ""))
  if content is not None:
    (tmp_path / "pinned_checkpoints.json").write_text(content)
  workdir_lib.pin_checkpoint(workdir, 7, "/runs/lora")
  out = capsys.readouterr().out
  assert out.startswith("warning: could not pin checkpoint 7 of ") and "/runs/lora" in out
  assert out.count("\n") == 1
  if content is not None:
    assert (tmp_path / "pinned_checkpoints.json").read_text() == content  # left as it was


# The LoRA base reference.

def test_lora_base_reference_is_the_absolute_workdir_the_step_and_the_cards_sha256(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs("base")
  workdir_lib.write_model_card("base", TINY, os.path.join("base", "t.model"))
  digest = hashlib.sha256((tmp_path / "base" / "model.json").read_bytes()).hexdigest()
  ref = workdir_lib.lora_base_reference("base", np.int64(20))
  assert ref == {"workdir": str(tmp_path / "base"), "step": 20, "model_sha256": digest}
  assert type(ref["step"]) is int  # pylint: disable=unidiomatic-typecheck  # it goes into JSON
  json.dumps(ref)


def test_check_lora_base_accepts_the_same_base_or_none_and_refuses_another_naming_what_differs():
  given = {"workdir": "/runs/base", "step": 20, "model_sha256": "aa"}
  workdir_lib.check_lora_base(None, given, "w")
  workdir_lib.check_lora_base(dict(given), given, "w")
  with raises_one_line(errors.RunError, "/runs/lora", "step: 10 vs 20", "init_params_from=/runs/base") as e:
    workdir_lib.check_lora_base({**given, "step": 10}, given, "/runs/lora")
  assert "model_sha256" not in str(e.value)
  with raises_one_line(errors.RunError, "model_sha256: 'bb' vs 'aa'"):
    workdir_lib.check_lora_base({**given, "model_sha256": "bb"}, given, "/runs/lora")
  with raises_one_line(errors.RunError, "extra: 1 vs None"):  # a key only the saved reference has
    workdir_lib.check_lora_base({**given, "extra": 1}, given, "/runs/lora")


def test_check_base_step_refuses_a_base_checkpoint_that_is_gone(tmp_path):
  with raises_one_line(errors.CheckpointError, f"checkpoint 5 of {tmp_path}", "/runs/lora"):
    workdir_lib.check_base_step(str(tmp_path), 5, "/runs/lora")


# The resume checks.

def test_check_seed():
  for saved, seed in [({}, 3), ({"seed": 3}, None), ({"seed": 3}, 3)]:
    workdir_lib.check_seed(saved, seed)
  with raises_one_line(errors.RunError, "seed=4", "seed=3"):
    workdir_lib.check_seed({"seed": 3}, 4)


def test_check_optim_name():
  for saved in ({}, {"optim": None}, {"optim": {"lr": 1}}, {"optim": {"name": "adamw"}}):
    workdir_lib.check_optim_name(saved, "adamw")
  with raises_one_line(errors.RunError, "optim.name: checkpoint 'adamw' vs config 'lion'"):
    workdir_lib.check_optim_name({"optim": {"name": "adamw"}}, "lion")


def test_check_optim_drift_refuses_only_a_changed_layout_with_changed_settings_and_names_them():
  optim = {"name": "adamw", "learning_rate": 1e-3, "b1": 0.9}
  saved = {"optim": {**optim, "name": "lion", "learning_rate": 3e-4}, "opt_state_tree": "Tree(lion)"}
  workdir_lib.check_optim_drift({"opt_state_tree": "Tree(lion)"}, optim, "Tree(adam)")  # no optim record
  workdir_lib.check_optim_drift({**saved, "opt_state_tree": ""}, optim, "Tree(adam)")  # no tree record
  workdir_lib.check_optim_drift(saved, optim, "Tree(lion)")  # same layout: lr and name may differ
  workdir_lib.check_optim_drift({**saved, "optim": optim}, optim, "Tree(adam)")  # no setting differs
  with raises_one_line(errors.RunError, "optim.learning_rate: checkpoint 0.0003 vs config 0.001",
                       "optim.name: checkpoint 'lion' vs config 'adamw'") as e:
    workdir_lib.check_optim_drift(saved, optim, "Tree(adam)")
  assert "b1" not in str(e.value)


def _stream(**changes):
  source = {"name": "", "weight": 1.0, "corpus": "text_files", "text_files": "/data/*.txt", "text_field": "",
            "validation_fraction": 0.1, "files": {"count": 3, "sha256": "aa"}}
  record = {"global_batch_size": 8, "data.seq_len": 64, "sources": [source],
            "tokenizer": {"model_type": "bpe", "vocab_size": 2048, "byte_fallback": True}}
  for key, value in changes.items():
    if key.startswith("source."):
      source[key[len("source."):]] = value
    elif key.startswith("tokenizer."):
      record["tokenizer"][key[len("tokenizer."):]] = value
    else:
      record[key] = value
  return record


def test_check_data_stream_accepts_an_equal_stream_or_a_missing_record():
  workdir_lib.check_data_stream({"data_stream": _stream()}, _stream())
  workdir_lib.check_data_stream({}, _stream(**{"data.seq_len": 128}))
  workdir_lib.check_data_stream({"data_stream": _stream()}, None)
  workdir_lib.check_data_stream({"data_stream": _stream(tokenizer=None)}, _stream(**{"tokenizer.vocab_size": 1}))


@pytest.mark.parametrize("changes, named", [
    ({"data.seq_len": 128}, "data.seq_len: checkpoint 64 vs config 128"),
    ({"global_batch_size": 16}, "global_batch_size: checkpoint 8 vs config 16"),
    ({"tokenizer.vocab_size": 4096}, "tokenizer.vocab_size: checkpoint 2048 vs config 4096"),
    ({"source.validation_fraction": 0.2}, "data.validation_fraction: checkpoint 0.1 vs config 0.2"),
    ({"source.files": {"count": 4, "sha256": "bb"}}, "the files data.text_files matches differ (3 at the checkpoint, "
                                                     "4 now"),
    ({"source.files": None}, "data.text_files: the matched files differ"),
    ({"source.name": "web"}, "data sources: checkpoint ['text_files'] vs config ['web']"),
])
def test_check_data_stream_names_the_differing_key(changes, named):
  with raises_one_line(errors.RunError, named) as e:
    workdir_lib.check_data_stream({"data_stream": _stream()}, _stream(**changes))
  assert str(e.value).count(" vs config ") + str(e.value).count(" differ") == 1  # only that key


def test_check_data_stream_names_a_mixture_component_and_sft_files():
  saved = _stream(**{"source.name": "chat", "source.corpus": "sft"})
  with raises_one_line(errors.RunError, "data.mixture.chat.sft_files", "3 at the checkpoint", "5 now"):
    workdir_lib.check_data_stream({"data_stream": saved},
                                  _stream(**{"source.name": "chat", "source.corpus": "sft",
                                             "source.files": {"count": 5, "sha256": "cc"}}))


def test_check_model_dims_ignores_runtime_fields_and_names_a_changed_dimension():
  saved = {"model": dataclasses.asdict(TINY)}
  workdir_lib.check_model_dims(saved, dataclasses.asdict(dataclasses.replace(
      TINY, dropout_rate=0.1, scan_layers=False, remat_policy="full", compute_dtype="bfloat16")))
  with raises_one_line(errors.RunError, "model.d_ff: checkpoint 32 vs config 64") as e:
    workdir_lib.check_model_dims(saved, dataclasses.asdict(dataclasses.replace(TINY, d_ff=64, dropout_rate=0.1)))
  assert "dropout_rate" not in str(e.value)  # a runtime field may change


def test_check_model_dims_reads_a_field_an_older_checkpoint_lacks_as_its_default():
  old = {"model": {k: v for k, v in dataclasses.asdict(TINY).items() if k not in ModelConfig.ADAPTER_FIELDS}}
  workdir_lib.check_model_dims(old, dataclasses.asdict(TINY))
  with raises_one_line(errors.RunError, "model.lora_rank: checkpoint 0 vs config 4"):
    workdir_lib.check_model_dims(old, dataclasses.asdict(dataclasses.replace(TINY, lora_rank=4)))


def test_check_model_card_names_the_dimension_model_json_changed():
  saved = {"model": dataclasses.asdict(TINY)}
  workdir_lib.check_model_card(dataclasses.replace(TINY, scan_layers=False), saved, "/w", 3)
  with raises_one_line(errors.RunError, "/w/model.json", "checkpoint 3", "num_layers: model.json 4 vs checkpoint 2"):
    workdir_lib.check_model_card(dataclasses.replace(TINY, num_layers=4), saved, "/w", 3)


def test_checkpoint_meta_holds_the_model_the_tokenizers_sha256_and_extras(tmp_path):
  tok = tmp_path / "t.model"
  tok.write_bytes(b"not really a tokenizer")
  meta = workdir_lib.checkpoint_meta(TINY, str(tok), seed=5)
  assert meta == {"model": dataclasses.asdict(TINY), "seed": 5,
                  "tokenizer_sha256": hashlib.sha256(b"not really a tokenizer").hexdigest()}
  workdir_lib.check_resumable(meta, meta, str(tok))  # a run's own metadata resumes
  with raises_one_line(errors.RunError, "seed=6", "seed=5"):
    workdir_lib.check_resumable(meta, {**meta, "seed": 6}, str(tok))


def test_check_tokenizer():
  workdir_lib.check_tokenizer({}, "aa", "t.model")
  workdir_lib.check_tokenizer({"tokenizer_sha256": "aa"}, "aa", "t.model")
  with raises_one_line(errors.RunError, "/w/t.model", "checkpoint 4"):
    workdir_lib.check_tokenizer({"tokenizer_sha256": "aa"}, "bb", "/w/t.model", step=4)
  with raises_one_line(errors.RunError, "/w/t.model"):
    workdir_lib.check_tokenizer({"tokenizer_sha256": "aa"}, "bb", "/w/t.model")


# Merging adapters.

def _merged_by_hand(params, rank, alpha, scan, layered=False):
  """W + A·B·alpha/rank for every adapted W, as matrix products of flattened A and B (per layer under a scanned
  'layers', whose leaves lead with the layer axis)."""
  out = {}
  for key, value in params.items():
    if isinstance(value, dict):
      out[key] = _merged_by_hand(value, rank, alpha, scan, layered or (scan and key == "layers"))
    elif not key.endswith(("_lora_a", "_lora_b")):
      a, b = params.get(key + "_lora_a"), params.get(key + "_lora_b")
      if a is None:
        out[key] = value
      elif layered:
        delta = np.stack([a[i].reshape(-1, rank) @ b[i].reshape(rank, -1) for i in range(a.shape[0])])
        out[key] = value + delta.reshape(value.shape) * alpha / rank
      else:
        out[key] = value + (a.reshape(-1, rank) @ b.reshape(rank, -1)).reshape(value.shape) * alpha / rank
  return out


@pytest.mark.parametrize("scan", [True, False])
def test_merge_adapters_folds_w_plus_a_b_alpha_over_rank_and_returns_the_plain_config(scan):
  cfg = dataclasses.replace(TINY, lora_rank=2, lora_alpha=6.0, lora_targets="q,v,mlp_out", scan_layers=scan)
  params = _random_params(cfg, 0)
  merged_cfg, merged = workdir_lib.merge_adapters(cfg, params)
  assert merged_cfg == dataclasses.replace(TINY, scan_layers=scan)
  expected = _merged_by_hand(params, rank=2, alpha=6.0, scan=scan)
  assert jax.tree.structure(merged) == jax.tree.structure(expected)
  jax.tree.map(lambda m, e: np.testing.assert_allclose(m, e, rtol=1e-5, atol=1e-5), merged, expected)
  name = "layers" if scan else "layers_0"
  assert not np.allclose(merged[name]["attn"]["query"], params[name]["attn"]["query"])  # the adapters mattered
  np.testing.assert_array_equal(merged[name]["attn"]["key"], params[name]["attn"]["key"])  # not a target


def test_merge_adapters_of_a_plain_model_returns_it_untouched():
  params = _random_params(TINY, 0)
  cfg, out = workdir_lib.merge_adapters(TINY, params)
  assert cfg is TINY and out is params


# load_model on a tiny workdir written here.

@pytest.fixture(name="tiny_workdir")
def tiny_workdir_fixture(tmp_path):
  """A workdir with a char tokenizer, model.json and parameter checkpoints at steps 2 and 3 (params seeds 2, 3)."""
  workdir = str(tmp_path / "run")
  tok = train_tokenizer(["hello world, the quick brown fox"], os.path.join(workdir, "tokenizer", "spm"),
                        model_type="char", vocab_size=0, byte_fallback=False)
  ckpt = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir), async_save=False)
  try:
    for step in (2, 3):
      ckpt.save_params(step, _random_params(TINY, step), workdir_lib.checkpoint_meta(TINY, tok.path))
  finally:
    ckpt.close()
  workdir_lib.write_model_card(workdir, TINY, tok.path)
  return workdir


def test_load_model_restores_the_newest_or_the_given_step_with_its_tokenizer(tiny_workdir):
  loaded = workdir_lib.load_model(tiny_workdir)
  assert loaded.step == 3 and loaded.cfg == TINY
  assert loaded.tokenizer.decode(loaded.tokenizer.encode("the fox")) == "the fox"
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params), _random_params(TINY, 3))
  older = workdir_lib.load_model(tiny_workdir, step=2)
  assert older.step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(older.params), _random_params(TINY, 2))


def test_load_model_refuses_an_edited_card_a_foreign_tokenizer_and_a_missing_step(tiny_workdir):
  card = os.path.join(tiny_workdir, "model.json")
  original = open(card, encoding="utf-8").read()
  edited = json.loads(original)
  edited["model"]["d_ff"] = 48
  with open(card, "w", encoding="utf-8") as f:
    json.dump(edited, f)
  with raises_one_line(errors.RunError, card, "checkpoint 3", "d_ff: model.json 48 vs checkpoint 32"):
    workdir_lib.load_model(tiny_workdir)
  with open(card, "w", encoding="utf-8") as f:
    f.write(original)
  with raises_one_line(errors.CheckpointError, "step 9", "[2, 3]"):
    workdir_lib.load_model(tiny_workdir, step=9)
  tok_path = workdir_lib.read_model_card(tiny_workdir)[1]
  train_tokenizer(["other text entirely"], tok_path[:-len(".model")], model_type="char", vocab_size=0,
                  byte_fallback=False)
  with raises_one_line(errors.RunError, tok_path, "checkpoint 3"):
    workdir_lib.load_model(tiny_workdir)
  os.remove(tok_path)
  with raises_one_line(errors.MissingFileError, tok_path, "model.json"):
    workdir_lib.load_model(tiny_workdir)
