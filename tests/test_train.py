"""End to end on the smoke config: golden losses, bit-exact resume, and every experiment config validates."""

import glob
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from conftest import losses
from conftest import restored_params
from conftest import smoke_config

from llm_jax import config as config_lib
from llm_jax import trainer
from llm_jax import workdir as workdir_lib
from llm_jax import writers
from llm_jax.data.text import clean_text
from llm_jax.evals import documents as doc_eval
from llm_jax.sweeps import runcard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Recorded from `experiments/smoke.py` on 8 simulated CPU devices (mesh data=8) on 2026-11-28.
# If you change the model, data pipeline, tokenizer or optimizer on purpose, rerun this test,
# check the new numbers are plausible (loss falls from ~6.3), and paste them here.
GOLDEN_TRAIN_LOSS_STEP_30 = 5.012191
GOLDEN_VAL_LOSS_STEP_30 = 4.976485
# The same run with the default optimizer (Muon 0.02, AdamW 3e-3 on the rest), recorded the same way on 2026-12-01.
GOLDEN_MUON_TRAIN_LOSS_STEP_30 = 4.969975
GOLDEN_MUON_VAL_LOSS_STEP_30 = 4.931727


@pytest.mark.slow
def test_smoke_run_matches_golden_losses(tmp_path):
  final = trainer.train_and_evaluate(config_lib.resolve(smoke_config()), str(tmp_path))
  assert final["loss"] == pytest.approx(GOLDEN_TRAIN_LOSS_STEP_30, abs=2e-4)
  assert final["val_loss"] == pytest.approx(GOLDEN_VAL_LOSS_STEP_30, abs=2e-4)
  assert final["val_perplexity"] == pytest.approx(np.exp(final["val_loss"]), rel=1e-6)
  # The loss must actually fall: 30 steps take a 512-token model well below uniform (ln 512 = 6.24).
  assert final["val_loss"] < np.log(512) - 1.0
  records = writers.read_metrics(str(tmp_path))
  assert [r["step"] for r in records if "loss" in r] == [10, 20, 30]
  for key in ("learning_rate", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "eta_s"):
    assert key in records[0]
  for name in ("config.json", "model.json", "metrics.jsonl"):
    assert os.path.exists(tmp_path / name)
  with open(tmp_path / "config.json", encoding="utf-8") as f:
    assert json.load(f)["model"] == "model.json"  # the workdir's one record of the model
  record = workdir_lib.read_run_config(str(tmp_path))
  # The settings chosen per backend, as given and as run (RunConfig.on_devices).
  assert record["model"]["attention_impl"] == "auto" and record["model"]["remat_policy"] == "auto"
  assert record["resolved"] == {"backend": "cpu", "attention_impl": "einsum", "remat_policy": "dots",
                                "causal_query_blocks": 2,  # CPU's two blocks divide the smoke config's 64 positions
                                "grad_accum_steps": record["resolved"]["grad_accum_steps"]}
  assert record["resolved"]["grad_accum_steps"] >= 1
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  card = runcard.read(str(tmp_path))
  assert card["status"] == "finished" and card["device_count"] == 8 and card["end_time"]
  assert card["final_metrics"]["val_loss"] == final["val_loss"]
  assert "jax" in card["packages"] and "git_dirty" in card and "config" not in card  # config.json holds it


@pytest.mark.slow
def test_smoke_run_with_the_default_optimizer_matches_its_golden_losses(tmp_path):
  c = smoke_config()
  defaults = config_lib.get_config().optim
  c.optim.update({k: defaults[k] for k in ("name", "learning_rate", "adam_learning_rate")})
  assert c.optim.name == "muon"  # the default this golden pins; re-record both if the default changes
  final = trainer.train_and_evaluate(config_lib.resolve(c), str(tmp_path))
  assert final["loss"] == pytest.approx(GOLDEN_MUON_TRAIN_LOSS_STEP_30, abs=2e-4)
  assert final["val_loss"] == pytest.approx(GOLDEN_MUON_VAL_LOSS_STEP_30, abs=2e-4)
  assert c.optim.learning_rate == 0.0  # derived: the optimizer's measured rate, which config.json records
  assert workdir_lib.read_run_config(str(tmp_path))["optim"]["learning_rate"] == 0.02


@pytest.mark.slow
def test_stop_and_resume_is_bit_exact(tmp_path, smoke_20):
  straight, resumed = smoke_20, str(tmp_path / "resumed")
  trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=20, stop_at_step=10)), resumed)
  assert losses(resumed) == losses(straight)[:1]
  trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=20)), resumed)
  assert losses(resumed) == losses(straight)  # same floats, no duplicated steps
  a, b = restored_params(straight, 20), restored_params(resumed, 20)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(REPO, "experiments", "*.py"))
                      if "def get_config(" in open(p, encoding="utf-8").read())


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_experiment_config_loads_and_validates(path):
  spec = importlib.util.spec_from_file_location("experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for variant in getattr(module, "VARIANTS", (None,)):
    c = module.get_config(variant) if variant else module.get_config()
    config_lib.check(c)


@pytest.mark.slow
def test_configured_eval_sets_are_scored_during_training(tmp_path):
  text = tmp_path / "held_out.txt"
  text.write_text("We the People of the United States, in Order to form a more perfect Union.\n")
  c = smoke_config(num_train_steps=15, eval_every=15,
                   eval_zero_shot_files=os.path.join(REPO, "experiments", "data", "zero_shot_example.jsonl"),
                   eval_text_files=str(text))
  trainer.train_and_evaluate(config_lib.resolve(c), str(tmp_path / "run"))
  records = [r for r in writers.read_metrics(str(tmp_path / "run")) if "val_loss" in r]
  assert [r["step"] for r in records] == [15]
  r = records[0]
  # The same figures through the other path: the saved step-15 checkpoint, loaded and scored by llm_jax.evaluate.
  zero_shot = doc_eval.zero_shot_workdir(str(tmp_path / "run"), c.eval_zero_shot_files, step=15)
  assert r["zero_shot/zero_shot_example/accuracy"] == zero_shot["accuracy"]
  assert r["zero_shot/zero_shot_example/accuracy_norm"] == zero_shot["accuracy_norm"]
  report = doc_eval.evaluate_workdir(str(tmp_path / "run"), step=15, text_files=str(text))
  assert r["eval/text_files/doc_loss"] == pytest.approx(report["doc_loss"], rel=1e-5)
  assert r["eval/text_files/doc_perplexity"] == pytest.approx(np.exp(r["eval/text_files/doc_loss"]), rel=1e-6)
  # Bits per byte by its definition: every token of the cleaned text scored once, over its UTF-8 bytes.
  cleaned = clean_text(text.read_text())
  num_tokens = len(workdir_lib.load_model(str(tmp_path / "run")).tokenizer.encode(cleaned))
  assert r["eval/text_files/bits_per_byte"] == pytest.approx(
      r["eval/text_files/doc_loss"] * num_tokens / np.log(2) / len(cleaned.encode("utf-8")), rel=1e-5)
