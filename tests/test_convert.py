"""Tests for Hugging Face conversion, against `transformers` itself: logits, greedy generation, loss, round trips."""

import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")
import tiny_hf  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import assert_cli_error  # noqa: E402
from conftest import raises_one_line  # noqa: E402

from llm_jax import errors  # noqa: E402
from llm_jax import sampling  # noqa: E402  # noqa: E402
from llm_jax import workdir as workdir_lib  # noqa: E402
from llm_jax.evals import documents as doc_eval  # noqa: E402
from llm_jax.hf import files as hf_files  # noqa: E402
from llm_jax.hf import weights  # noqa: E402
from llm_jax.model import Transformer  # noqa: E402
from llm_jax.model_config import ModelConfig  # noqa: E402

FAMILIES = ("gpt2", "llama")
IDS = np.random.default_rng(0).integers(0, tiny_hf.BPE_VOCAB, size=(3, 48))
PROMPT = "The meaning of"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """{family: (HF model, HF directory, llm_jax workdir)} for a tiny random GPT-2 and Llama."""
  root = tmp_path_factory.mktemp("convert")
  out = {}
  for family, build in (("gpt2", tiny_hf.gpt2_dir), ("llama", tiny_hf.llama_dir)):
    hf_dir, workdir = str(root / f"hf_{family}"), str(root / f"wd_{family}")
    model = build(hf_dir)
    hf_files.import_hf(hf_dir, workdir)
    out[family] = (model, hf_dir, workdir)
  return out


def _our_logits(workdir: str, ids: np.ndarray) -> np.ndarray:
  loaded = workdir_lib.load_model(workdir)
  return np.asarray(Transformer(loaded.cfg).apply({"params": loaded.params}, jnp.asarray(ids))[0])


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(converted, family):
  model, _, workdir = converted[family]
  diff = np.abs(_our_logits(workdir, IDS) - _hf_logits(model, IDS)).max()
  print(f"{family} HF -> llm_jax max |logit difference| {diff:.2e}")
  assert diff <= 1e-4


def test_converted_config(converted):
  cfg, _ = workdir_lib.read_model_card(converted["llama"][2])
  assert (cfg.family, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model) == ("llama", 4, 2, 32, 64)
  assert (cfg.rope_scaling_factor, cfg.rope_original_max_len, cfg.tie_embeddings) == (4.0, 32, False)
  gpt2_cfg, tokenizer_path = workdir_lib.read_model_card(converted["gpt2"][2])
  assert gpt2_cfg.tie_embeddings and os.path.basename(tokenizer_path) == "tokenizer.json"
  # A converted workdir holds the model and its tokenizer, not an invented training config.
  assert not os.path.exists(os.path.join(converted["gpt2"][2], "config.json"))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(converted, family):
  model, _, workdir = converted[family]
  loaded = workdir_lib.load_model(workdir)
  tok = loaded.tokenizer
  prompt_ids = ([tok.bos_id] if tok.bos_id >= 0 else []) + tok.encode(PROMPT)
  ours = sampling.generate(loaded.params, loaded.cfg, prompt_ids, max_length=40, temperature=0.0, eos_id=tok.eos_id)
  with torch.no_grad():
    ref = model.generate(torch.tensor([prompt_ids]), max_length=40, do_sample=False,
                         pad_token_id=tok.eos_id).numpy()[0]
  ref = np.concatenate([ref, np.full(40 - len(ref), tok.eos_id)])  # HF stops early at eos; we pad with it
  np.testing.assert_array_equal(ours[0], ref)
  text = sampling.generate_texts(loaded.params, loaded.cfg, tok, PROMPT, max_length=40, num_return_sequences=1,
                                 temperature=0.0, top_k=0, top_p=1.0, seed=0)[0]
  assert text == tok.decode([t for t in ref if t != tok.eos_id])
  print(f"{family} greedy ids {ours[0].tolist()} text {text!r}")


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_to_hf(converted, family, tmp_path, caplog):
  model, _, workdir = converted[family]
  hf_out = str(tmp_path / "back")
  hf_files.export_hf(workdir, hf_out)
  transformers.utils.logging.enable_propagation()  # its logger does not propagate to caplog by default
  try:
    with caplog.at_level(logging.WARNING):
      reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(hf_out, output_loading_info=True)
  finally:
    transformers.utils.logging.disable_propagation()
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
  noisy = [r.getMessage() for r in caplog.records if any(w in r.getMessage().lower() for w in (
      "missing", "unexpected", "newly initialized", "not used", "not initialized", "load report"))]
  assert not noisy, noisy
  diff_ours = np.abs(_hf_logits(reloaded.eval(), IDS) - _our_logits(workdir, IDS)).max()
  diff_orig = np.abs(_hf_logits(reloaded, IDS) - _hf_logits(model, IDS)).max()
  print(f"{family} llm_jax -> HF max |logit difference| {diff_ours:.2e} (vs the original HF model {diff_orig:.2e})")
  assert diff_ours <= 1e-4 and diff_orig <= 1e-4
  hf_tok = transformers.AutoTokenizer.from_pretrained(hf_out)
  ours = workdir_lib.load_model(workdir).tokenizer
  assert hf_tok(PROMPT).input_ids == ([ours.bos_id] if ours.bos_id >= 0 else []) + ours.encode(PROMPT)


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_equals_transformers_loss(converted, family):
  model, _, workdir = converted[family]
  loaded = workdir_lib.load_model(workdir)
  text = "Assignment statements are used to (re)bind names to values."
  got = doc_eval.evaluate_documents(loaded.params, loaded.cfg, loaded.tokenizer, [text], seq_len=64, batch_size=2)
  tok = loaded.tokenizer
  ids = [tok.bos_id if tok.bos_id >= 0 else tok.eos_id] + tok.encode(text)
  with torch.no_grad():
    hf_loss = float(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss)  # mean NLL of ids[1:]
  assert got["tokens"] == len(ids) - 1
  assert math.isclose(got["doc_loss"], hf_loss, rel_tol=1e-5)
  assert math.isclose(got["doc_perplexity"], math.exp(hf_loss), rel_tol=1e-5)
  assert math.isclose(got["bits_per_byte"], hf_loss * (len(ids) - 1) / math.log(2) / len(text.encode()), rel_tol=1e-5)


@pytest.mark.slow
def test_continued_training_from_converted_weights(converted, tmp_path):
  from llm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from llm_jax import trainer  # pylint: disable=import-outside-toplevel

  for i in range(3):
    (tmp_path / f"doc{i}.txt").write_text("\n".join(tiny_hf.TEXTS[10 * i:10 * i + 10]))
  config = config_lib.get_config()
  config.init_params_from = converted["gpt2"][2]
  config.data.corpus, config.data.text_files, config.data.seq_len = "text_files", str(tmp_path / "*.txt"), 32
  config.num_train_steps, config.global_batch_size, config.eval_batch_size, config.eval_batches = 2, 8, 8, 1
  config.optim.warmup_steps, config.log_every, config.sample.max_length = 1, 1, 40
  final = trainer.train_and_evaluate(config_lib.resolve(config), str(tmp_path / "run"))
  assert math.isfinite(final["loss"]) and math.isfinite(final["val_loss"])
  # Two small AdamW steps move each weight by under 2 * lr; a fresh initialisation would be ~0.1 away.
  start = workdir_lib.load_model(converted["gpt2"][2]).params["embed"]
  trained = workdir_lib.load_model(str(tmp_path / "run")).params["embed"]
  peak_rate = config_lib.resolve(config).optim.learning_rate
  assert 0 < np.abs(np.asarray(trained) - np.asarray(start)).max() < 2.5 * peak_rate


@pytest.mark.parametrize("change, fragments", [
    ({"model_type": "mistral"}, ("model_type 'mistral'", "gpt2, llama")),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ("rope_scaling", "'yarn'")),
    ({"attention_bias": True}, ("attention_bias=true",)),
    ({"hidden_act": "gelu"}, ("hidden_act 'gelu'",)),
])
def test_unsupported_configs(converted, tmp_path, change, fragments):
  hf_dir = str(tmp_path / "hf")
  shutil.copytree(converted["llama"][1], hf_dir)
  with open(os.path.join(hf_dir, "config.json")) as f:
    config = json.load(f)
  config.pop("rope_parameters", None)
  config.update(change)
  tiny_hf.write_json(os.path.join(hf_dir, "config.json"), config)
  with raises_one_line(errors.DataError, *fragments):
    hf_files.import_hf(hf_dir, str(tmp_path / "wd"))


@pytest.mark.parametrize("remove, fragments", [
    ("config.json", ("{hf}/config.json",)),
    ("model.safetensors", ("{hf} ", "*.safetensors")),
    ("tokenizer.json", ("{hf} ", "tokenizer.json")),
])
def test_missing_files(converted, tmp_path, remove, fragments):
  hf_dir = str(tmp_path / "hf")
  shutil.copytree(converted["llama"][1], hf_dir)
  os.remove(os.path.join(hf_dir, remove))
  with raises_one_line(errors.MissingFileError, *[f.format(hf=hf_dir) for f in fragments]):
    hf_files.import_hf(hf_dir, str(tmp_path / "wd"))


def test_weights_that_do_not_fit_the_config(converted, tmp_path):
  hf_dir = str(tmp_path / "hf")
  shutil.copytree(converted["gpt2"][1], hf_dir)
  with open(os.path.join(hf_dir, "config.json")) as f:
    config = json.load(f)
  tiny_hf.write_json(os.path.join(hf_dir, "config.json"), {**config, "n_layer": 1})
  with raises_one_line(errors.DataError, "gpt2", "h.1."):
    hf_files.import_hf(hf_dir, str(tmp_path / "wd"))


def test_a_truncated_safetensors_file_is_one_error_and_leaves_no_workdir(converted, tmp_path):
  hf_dir = str(tmp_path / "hf")
  shutil.copytree(converted["gpt2"][1], hf_dir)
  weights_path = os.path.join(hf_dir, "model.safetensors")
  with open(weights_path, "r+b") as f:
    f.truncate(os.path.getsize(weights_path) // 2)
  with raises_one_line(errors.DataError, weights_path):
    hf_files.import_hf(hf_dir, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "wd")  # built aside, never half-moved into place
  assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_export_is_readable_by_others_and_refuses_a_file_as_directory(converted, tmp_path):
  out = str(tmp_path / "hf_out")
  hf_files.export_hf(converted["llama"][2], out)
  umask = os.umask(0)
  os.umask(umask)
  for name in os.listdir(out):
    assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o666 & ~umask, name
  (tmp_path / "a_file").write_text("x")
  with raises_one_line(errors.ConfigError, f"--to_hf={tmp_path / 'a_file'}"):
    hf_files.export_hf(converted["llama"][2], str(tmp_path / "a_file"))
  with raises_one_line(errors.ConfigError, f"--workdir={tmp_path / 'a_file'}"):
    hf_files.import_hf(converted["llama"][1], str(tmp_path / "a_file"))


def test_an_edited_model_card_is_refused_naming_the_field(converted, tmp_path):
  workdir = str(tmp_path / "wd")
  shutil.copytree(converted["gpt2"][2], workdir)
  card_path = os.path.join(workdir, "model.json")
  with open(card_path) as f:
    card = json.load(f)
  card["model"]["d_model"] += 8
  tiny_hf.write_json(card_path, card)
  with raises_one_line(errors.RunError, card_path, "checkpoint 0", f"d_model: model.json {card['model']['d_model']}"):
    workdir_lib.load_model(workdir)


def test_conversion_into_a_used_workdir_is_refused(converted):
  with raises_one_line(errors.ConfigError, f"--workdir={converted['gpt2'][2]}"):
    hf_files.import_hf(converted["gpt2"][1], converted["gpt2"][2])


@pytest.mark.slow
def test_command_line(converted, tmp_path):
  missing = subprocess.run([sys.executable, "-m", "llm_jax.convert", f"--from_hf={tmp_path / 'nope'}",
                            f"--workdir={tmp_path / 'wd'}"], capture_output=True, text=True, check=False)
  assert_cli_error(missing, "convert", f"--from_hf={tmp_path / 'nope'}")
  out = subprocess.run([sys.executable, "-m", "llm_jax.convert", f"--workdir={converted['llama'][2]}",
                        f"--to_hf={tmp_path / 'hf'}"], capture_output=True, text=True, check=True)
  assert "wrote llama checkpoint 0" in out.stdout
  assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors", "tokenizer.json",
                                                 "tokenizer_config.json"]


def test_unscanned_params_export_like_scanned(converted):
  loaded = workdir_lib.load_model(converted["llama"][2])
  unrolled = {k: v for k, v in loaded.params.items() if k != "layers"}
  for i, layer in enumerate(weights.layer_trees(loaded.params, loaded.cfg)):
    unrolled[f"layers_{i}"] = layer
  scanned = weights.params_to_hf(loaded.params, loaded.cfg)
  for name, x in weights.params_to_hf(unrolled, loaded.cfg).items():
    np.testing.assert_array_equal(x, scanned[name])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("knob, value", [("qk_norm", True), ("logit_softcap", 30.0), ("mlp_activation", "relu2")])
def test_export_refuses_knobs_the_hf_format_cannot_express(family, knob, value):
  base = ModelConfig(family=family, num_kv_heads=4, tie_embeddings=False)
  assert weights.hf_config_from_model(base, -1, 0)["tie_word_embeddings"] is False  # an untied head is expressed
  with raises_one_line(errors.DataError, f"{knob}="):
    weights.hf_config_from_model(dataclasses.replace(base, **{knob: value}), -1, 0)
