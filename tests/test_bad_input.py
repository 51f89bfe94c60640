"""Every entry point answers bad input with one line naming the problem, before any long compile."""

import os
import shutil

import pytest
from conftest import run_module
from test_train import smoke_config

from llm_jax import trainer

SMOKE = "--config=experiments/smoke.py"


@pytest.fixture(name="trained", scope="module")
def trained_fixture(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("trained"))
  trainer.train_and_evaluate(smoke_config(num_train_steps=10), workdir)
  return workdir


@pytest.fixture(name="files", scope="module")
def files_fixture(tmp_path_factory):
  d = tmp_path_factory.mktemp("files")
  (d / "empty.txt").write_text("  \n\n[Applause]\n")
  (d / "latin1.txt").write_bytes("caf\u00e9 society\n".encode("latin-1"))
  return str(d)


TRAIN_CASES = [
    ("unknown flag", ["--nonsense=1"], "Unknown command line flag 'nonsense'"),
    ("misspelt config key", ["--config.model.widht=3"], "unknown config key in --config.model.widht=3"),
    ("wrong type", ["--config.num_train_steps=abc"], "invalid literal for int()"),
    ("missing config file", ["--config=experiments/nope.py"], "config file experiments/nope.py does not exist"),
    ("unknown variant", ["--config=experiments/smoke.py:gpt3"], "unknown variant 'gpt3'"),
    ("unknown family", ["--config.model.family=bert"], "model.family='bert' is not one of gpt2, llama"),
    ("heads do not divide width", ["--config.model.num_heads=3"], "model.num_heads=3 does not divide"),
    ("kv heads do not divide heads", ["--config.model.num_kv_heads=3"], "model.num_kv_heads=3 does not divide"),
    ("batch does not divide devices", ["--config.global_batch_size=12"], "does not divide over data x fsdp"),
    ("accumulation does not divide batch", ["--config.grad_accum_steps=3"], "grad_accum_steps=3"),
    ("negative learning rate", ["--config.optim.learning_rate=-1.0"], "optim.learning_rate=-1.0 must be positive"),
    ("unknown schedule", ["--config.optim.schedule=step"], "optim.schedule='step' is not one of"),
    ("max_len shorter than sequences", ["--config.model.max_len=16"], "model.max_len=16 is shorter than"),
    ("mesh larger than devices", ["--config.mesh.data=16"], "needs 16 devices but 8 are present"),
    ("missing text files", ["--config.data.corpus=text_files", "--config.data.text_files=/nonexistent/*.txt"],
     "matches no files"),
    ("unknown corpus", ["--config.data.corpus=wikipedia"], "data.corpus='wikipedia' is not one of"),
    ("tfds dataset not prepared", ["--config.data.corpus=tfds", "--config.data.tfds_name=lm1b",
                                   "--config.data.data_dir={tmp}"], "not prepared"),
    ("empty corpus", ["--config.data.corpus=text_files", "--config.data.text_files={files}/empty.txt"], "empty"),
    ("non-UTF-8 file", ["--config.data.corpus=text_files", "--config.data.text_files={files}/latin1.txt"],
     "UTF-8"),
    ("missing workdir flag", ["--workdir="], "--workdir"),
]


@pytest.mark.parametrize("name, args, fragment", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_rejects_bad_input(name, args, fragment, files, tmp_path):
  del name
  args = [a.format(files=files, tmp=tmp_path) for a in args]
  workdir = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={tmp_path / 'run'}"]
  config = [] if any(a.startswith("--config=") for a in args) else [SMOKE]
  result = run_module("llm_jax.train", *config, *workdir, *args)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


GENERATE_CASES = [
    ("missing workdir", ["--workdir=/nonexistent/run"], "does not exist"),
    ("workdir without a model", ["--workdir={tmp}"], "model.json is missing"),
    ("max_length shorter than the prompt", ["--workdir={run}", "--max_length=3"], "is not longer than the prompt"),
    ("max_length beyond learned positions", ["--workdir={run}", "--max_length=500"], "learned positions"),
    ("negative temperature", ["--workdir={run}", "--temperature=-1"], "--temperature=-1.0 is negative"),
    ("top_p out of range", ["--workdir={run}", "--top_p=1.5"], "--top_p=1.5 is outside (0, 1]"),
    ("no such checkpoint", ["--workdir={run}", "--checkpoint_step=7"], "no checkpoint at step 7"),
    ("wrong flag type", ["--workdir={run}", "--max_length=many"], "--max_length"),
]


@pytest.mark.parametrize("name, args, fragment", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_rejects_bad_input(name, args, fragment, trained, tmp_path):
  del name
  result = run_module("llm_jax.generate", *[a.format(run=trained, tmp=tmp_path) for a in args])
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]


def test_generate_refuses_a_tokenizer_that_does_not_match_the_checkpoint(trained, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(trained, copy, ignore=shutil.ignore_patterns(".lock"))
  tokenizer_dir = copy / "tokenizer"
  model_file = next(p for p in tokenizer_dir.iterdir() if p.suffix == ".model")
  other = next(iter(sorted((copy / "tokenizer").glob("*.model"))))
  data = bytearray(other.read_bytes())
  data[-1] ^= 1  # a different file of the same size
  model_file.write_bytes(bytes(data))
  result = run_module("llm_jax.generate", f"--workdir={copy}")
  assert result.returncode == 2
  assert "is not the one checkpoint" in result.stderr


OTHER_CASES = [
    ("llm_jax.evaluate", ["--workdir=/nonexistent/run"], "does not exist"),
    ("llm_jax.evaluate", ["--workdir={run}", "--zero_shot=/nonexistent.jsonl"], "zero-shot file"),
    ("llm_jax.evaluate", ["--workdir={run}", "--text_files=/nonexistent/*.txt"], "matches no files"),
    ("llm_jax.convert", ["--workdir={tmp}"], "pass exactly one of --from_hf"),
    ("llm_jax.convert", ["--from_hf=/nonexistent", "--workdir={tmp}"], "is not a directory"),
    ("llm_jax.sweep", ["--sweep=/nonexistent.py", "--root={tmp}"], "sweep file /nonexistent.py does not exist"),
    ("llm_jax.bench", ["--configs=huge"], "unknown bench config 'huge'"),
]


@pytest.mark.parametrize("module, args, fragment", OTHER_CASES, ids=[f"{c[0]} {c[2]}" for c in OTHER_CASES])
def test_other_entry_points_reject_bad_input(module, args, fragment, trained, tmp_path):
  result = run_module(module, *[a.format(run=trained, tmp=tmp_path) for a in args])
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]
