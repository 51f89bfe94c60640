"""Tests for evaluation: perplexity and bits per byte against their definitions, windows, splits and the CLI."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf
from conftest import assert_cli_error
from conftest import raises_one_line

from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import paths
from llm_jax import workdir as workdir_lib
from llm_jax.checkpoint import Checkpointer
from llm_jax.data import corpus
from llm_jax.evals import documents as doc_eval
from llm_jax.evals import scoring
from llm_jax.model import Transformer
from llm_jax.model_config import ModelConfig
from llm_jax.tokenizer import train_tokenizer

CFG = ModelConfig(family="gpt2", vocab_size=400, num_layers=2, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                  d_ff=64, max_len=64)
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "experiments", "data", "zero_shot_example.jsonl")
SHORT_DOCS = ["Assignment statements bind names to values.", "Café: déjà vu!\nA second line."]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir as training leaves it: checkpoint, model card, tokenizer and config.json (a text_files corpus)."""
  root = tmp_path_factory.mktemp("eval")
  for i in range(3):
    (root / f"doc{i}.txt").write_text("\n".join(tiny_hf.TEXTS[20 * i:20 * i + 20]))
  workdir = str(root / "run")
  tok = train_tokenizer(tiny_hf.TEXTS, os.path.join(workdir, "tokenizer", "spm"), model_type="bpe", vocab_size=400)
  params = nn.unbox(Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  params = jax.tree.map(lambda x: x * 5, params)  # sharper than initialisation, so losses differ from ln V
  ckpt = Checkpointer(workdir_lib.checkpoint_dir(workdir), keep=1, async_save=False)
  ckpt.save_params(0, params, {"model": dataclasses.asdict(CFG), "tokenizer_sha256": paths.file_sha256(tok.path)})
  ckpt.close()
  workdir_lib.write_model_card(workdir, CFG, tok.path)
  config = config_lib.get_config()
  config.data.corpus, config.data.text_files, config.data.seq_len = "text_files", str(root / "*.txt"), 32
  config.sample.max_length = 32
  workdir_lib.write_run_config(workdir, config_lib.check(config).record())
  return workdir, config


def _reference_nll(loaded, ids: list[int], last: int = 0) -> float:
  """Summed NLL of ids[1:] (only the `last` ones if set) from one forward pass and a float64 log-softmax."""
  logits = np.asarray(Transformer(loaded.cfg).apply({"params": loaded.params}, jnp.asarray([ids[:-1]]))[0][0],
                      np.float64)
  top = logits.max(axis=-1)
  log_z = np.log(np.exp(logits - top[:, None]).sum(axis=-1)) + top
  nll = [log_z[i] - logits[i, t] for i, t in enumerate(ids[1:])]
  return float(sum(nll[-last:] if last else nll))


def test_perplexity_and_bits_per_byte_by_definition(run):
  loaded = workdir_lib.load_model(run[0])
  got = doc_eval.evaluate_documents(loaded.params, loaded.cfg, loaded.tokenizer, SHORT_DOCS, seq_len=64)
  token_ids = [[loaded.tokenizer.bos_id] + loaded.tokenizer.encode(doc) for doc in SHORT_DOCS]
  nll = sum(_reference_nll(loaded, ids) for ids in token_ids)
  tokens = sum(len(ids) - 1 for ids in token_ids)
  num_bytes = sum(len(doc.encode("utf-8")) for doc in SHORT_DOCS)
  assert got["tokens"] == tokens and got["bytes"] == num_bytes and got["documents"] == 2
  assert math.isclose(got["doc_loss"], nll / tokens, rel_tol=1e-5)
  assert math.isclose(got["doc_perplexity"], math.exp(nll / tokens), rel_tol=1e-5)
  assert math.isclose(got["bits_per_byte"], nll / math.log(2) / num_bytes, rel_tol=1e-5)
  assert got["doc_loss"] > 0.5 and abs(got["doc_loss"] - math.log(400)) > 0.1
  assert got["tokens_per_s"] > 0


@pytest.mark.slow
def test_disjoint_windows_of_a_long_document(run):
  loaded = workdir_lib.load_model(run[0])
  doc = tiny_hf.TEXTS[3][:1500]
  ids = [loaded.tokenizer.bos_id] + loaded.tokenizer.encode(doc)
  assert len(ids) > 3 * 32
  # Disjoint runs of 32 targets, each read from the 32 tokens before its end (BOS first in the first one); the
  # last, shorter run is read from a full window too, so its targets keep their context.
  num_targets, nll = len(ids) - 1, 0.0
  for start in range(0, num_targets, 32):
    end = min(start + 32, num_targets)
    nll += _reference_nll(loaded, ids[max(0, end - 32):end + 1], last=end - start)
  got = doc_eval.evaluate_documents(loaded.params, loaded.cfg, loaded.tokenizer, [doc], seq_len=32, batch_size=4)
  assert got["tokens"] == len(ids) - 1
  assert math.isclose(got["doc_loss"] * got["tokens"], nll, rel_tol=1e-5)


@pytest.mark.parametrize("n, seq_len, stride", [(1, 8, 8), (8, 8, 8), (9, 8, 8), (50, 8, 3), (50, 16, 1), (7, 4, 2)])
def test_windows_score_every_token_once(n, seq_len, stride):
  ids = list(range(100, 100 + n))
  windows = doc_eval.document_windows(ids, 1, seq_len, stride)
  scored = [t for seq, k in windows for t in seq[len(seq) - k:]]
  assert scored == ids
  assert all(len(seq) <= seq_len + 1 for seq, _ in windows)
  assert windows[0][0][0] == 1  # the first window reads from the conditioning token
  for seq, k in windows[1:]:  # later windows are full, with seq_len - stride tokens of context or more
    assert len(seq) == seq_len + 1 and len(seq) - 1 - k >= seq_len - stride


def test_validation_split_from_the_run_config(run):
  workdir, config = run
  report = doc_eval.evaluate_workdir(workdir, batch_size=4)
  val_docs = corpus.load_documents(config_lib.resolve(config).data, "validation")
  assert report["split"] == "validation" and report["seq_len"] == 32 and report["checkpoint_step"] == 0
  assert report["documents"] == len(val_docs) and report["bytes"] == sum(len(d.encode()) for d in val_docs)
  with raises_one_line(errors.DataError, f"--text_files={os.path.join(workdir, '*.none')!r}"):
    doc_eval.evaluate_workdir(workdir, text_files=os.path.join(workdir, "*.none"))


def test_training_evaluator_matches_the_library(run):
  loaded = workdir_lib.load_model(run[0])
  evaluator = doc_eval.TrainingEvaluator(loaded.cfg, loaded.tokenizer, text_sets={"short": SHORT_DOCS},
                                         zero_shot_files=[EXAMPLE], seq_len=64, batch_size=4)
  got = evaluator(loaded.params)
  text = doc_eval.evaluate_documents(loaded.params, loaded.cfg, loaded.tokenizer, SHORT_DOCS, seq_len=64)
  result = scoring.zero_shot(loaded.params, loaded.cfg, loaded.tokenizer, scoring.read_items(EXAMPLE))
  zero_shot = {f"zero_shot/zero_shot_example/{k}": v for k, v in result.accuracies().items()}
  assert sorted(got) == sorted(["eval/short/doc_loss", "eval/short/doc_perplexity", "eval/short/bits_per_byte",
                                *zero_shot])
  assert math.isclose(got["eval/short/bits_per_byte"], text["bits_per_byte"], rel_tol=1e-6)
  assert all(got[k] == v for k, v in zero_shot.items())


@pytest.mark.slow
def test_command_line(run, tmp_path):
  workdir = run[0]
  env = {**os.environ, "XLA_FLAGS": ""}
  files = run[1].data.text_files
  out = subprocess.run([sys.executable, "-m", "llm_jax.evaluate", f"--workdir={workdir}", f"--text_files={files}"],
                       capture_output=True, text=True, check=True, env=env)
  with open(os.path.join(workdir, "eval_text_files_0.json")) as f:
    report = json.load(f)
  assert f"doc_loss {report['doc_loss']:.4f}" in out.stdout and "bits/byte" in out.stdout
  expected = doc_eval.evaluate_workdir(workdir, text_files=files)
  assert math.isclose(report["doc_loss"], expected["doc_loss"], rel_tol=1e-6) and report["tokens"] == expected["tokens"]
  out = subprocess.run([sys.executable, "-m", "llm_jax.evaluate", f"--workdir={workdir}", f"--zero_shot={EXAMPLE}",
                        f"--output={tmp_path / 'zs.json'}"], capture_output=True, text=True, check=True, env=env)
  with open(tmp_path / "zs.json") as f:
    report = json.load(f)
  assert report["items"] == 8 and len(report["predictions"]) == 8 and "accuracy_norm" in report
  bad = subprocess.run([sys.executable, "-m", "llm_jax.evaluate", f"--workdir={tmp_path / 'none'}"],
                       capture_output=True, text=True, check=False, env=env)
  assert_cli_error(bad, "evaluate", f"--workdir={tmp_path / 'none'}")
