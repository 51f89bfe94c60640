"""Every entry point answers bad input with one line naming the problem, before any long compile."""

import dataclasses
import json
import os
import shutil

import pytest
from conftest import assert_cli_error
from conftest import raises_one_line
from conftest import run_module
from conftest import smoke_config

from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import sampling
from llm_jax import trainer
from llm_jax import workdir as workdir_lib
from llm_jax.data import sources

SMOKE = "--config=experiments/smoke.py"


@pytest.fixture(name="trained", scope="module")
def trained_fixture(pretrained):
  """The session's 10-step smoke run (tests/conftest.py), shared with the SFT and LoRA tests: copy it to change it."""
  return pretrained


@pytest.fixture(name="files", scope="module")
def files_fixture(tmp_path_factory):
  d = tmp_path_factory.mktemp("files")
  (d / "empty.txt").write_text("  \n\n[Applause]\n")
  (d / "latin1.txt").write_bytes("caf\u00e9 society\n".encode("latin-1"))
  (d / "text.txt").write_text("a few words of text\n")
  return str(d)


def _unwritable(tmp_path) -> str:
  """A directory path no one can create: chmod stops other users; root is stopped only by a read-only mount."""
  if os.geteuid() == 0:
    return "/sys/llm_jax_run"
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o555)
  return str(locked / "run")


def _copy_run(trained, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(trained, copy, ignore=shutil.ignore_patterns(".lock"))
  return copy


# Config values validate() refuses before anything runs: checked in-process (a subprocess each would cost ~3 s;
# the train cases below show the same errors reach the command line as one line). Each names the offending key and
# value (as the flag to change where the message says so), the other setting it clashes with, and any number the
# check computes; the advice around them may be reworded.
CONFIG_CASES = [
    ("sample.top_p", 0.0, ("--config.sample.top_p=0.0",)),
    ("sample.top_k", -1, ("--config.sample.top_k=-1",)),
    ("sample.temperature", -1.0, ("--config.sample.temperature=-1.0",)),
    ("sample.temperature", float("nan"), ("--config.sample.temperature=nan",)),
    ("sample.num_return_sequences", 0, ("--config.sample.num_return_sequences=0",)),
    ("sample.max_length", 1, ("--config.sample.max_length=1",)),
    ("sample.max_length", 65, ("--config.sample.max_length=65", "64 learned positions")),
    ("sample.prompt", "caf\udce9", ("--config.sample.prompt", "UTF-8")),
    ("data.text_files", "*.txt", ("data.text_files", "data.corpus='sotu'", "--config.data.corpus=text_files")),
    ("data.tfds_name", "lm1b", ("data.tfds_name", "data.corpus='sotu'", "--config.data.corpus=tfds")),
    ("optim.momentum", 0.5, ("optim.momentum", "optim.name='adamw'", "--config.optim.name=sgd")),
    ("optim.nesterov", True, ("optim.nesterov", "optim.name='adamw'")),
    ("optim.decay_fraction", 0.3, ("optim.decay_fraction", "optim.schedule='cosine'", "--config.optim.schedule=wsd",
                                   "optim.decay_fraction=0.2")),
    ("model.rope_theta", 5e5, ("model.rope_theta", "model.family='gpt2'")),
    ("model.rope_scaling_factor", 8.0, ("model.rope_scaling_factor", "model.family='gpt2'")),
    ("optim.min_lr_ratio", -1.0, ("optim.min_lr_ratio=-1.0",)),
    ("optim.min_lr_ratio", 1.5, ("optim.min_lr_ratio=1.5",)),
    ("model.head_dim", -1, ("model.head_dim=-1",)),
    ("model.d_ff", -5, ("model.d_ff=-5",)),
    ("model.num_kv_heads", -2, ("model.num_kv_heads=-2",)),
    ("model.max_len", -1, ("model.max_len=-1",)),
    ("model.vocab_size", -3, ("model.vocab_size=-3",)),
    ("optim.learning_rate", float("inf"), ("optim.learning_rate=inf",)),
    ("optim.learning_rate", float("nan"), ("optim.learning_rate=nan",)),
    ("optim.weight_decay", -0.1, ("optim.weight_decay=-0.1",)),
    ("optim.grad_clip_norm", -1.0, ("optim.grad_clip_norm=-1.0",)),
    ("optim.warmup_steps", 31, ("optim.warmup_steps=31", "num_train_steps=30")),
    ("data.validation_fraction", 0.0, ("data.validation_fraction=0.0",)),
    ("data.validation_fraction", 1.0, ("data.validation_fraction=1.0",)),
    ("data.validation_fraction", 0.3, ("data.validation_fraction", "data.corpus='sotu'")),
    ("eval_harness_limit", 5, ("eval_harness_limit", "eval_harness_tasks")),
    ("eval_harness_include_path", "tests", ("eval_harness_include_path", "eval_harness_tasks")),
    ("extra_eval_every", 5, ("extra_eval_every", "eval_text_files", "eval_zero_shot_files", "eval_harness_tasks")),
    ("extra_eval_every", -1, ("extra_eval_every=-1",)),
    ("data.sft_files", "rows.jsonl", ("data.sft_files", "data.corpus='sotu'", "--config.data.corpus=sft")),
    ("data.train_on_prompt", True, ("data.train_on_prompt", "data.corpus='sotu'")),
    ("data.corpus", "sft", ("data.corpus='sft'", "--config.data.sft_files=")),
    ("model.lora_rank", 4, ("model.lora_rank=4", "--config.init_params_from=")),
    ("model.lora_rank", -1, ("model.lora_rank=-1",)),
    ("model.lora_targets", "q,o", ("model.lora_targets", "model.lora_rank=0")),
    ("optim.adam_learning_rate", 1e-3, ("optim.adam_learning_rate", "optim.name='adamw'", "--config.optim.name=muon")),
    ("optim.lr_multipliers", "embed", ("optim.lr_multipliers", "'embed'")),
    ("optim.lr_multipliers", "layers=2", ("optim.lr_multipliers", "'layers=2'")),
    ("model.logit_softcap", -1.0, ("model.logit_softcap=-1.0",)),
    ("model.mlp_activation", "swish", ("model.mlp_activation='swish'", "default, relu2")),
    ("z_loss", -1e-4, ("z_loss=-0.0001",)),
    ("z_loss", float("nan"), ("z_loss=nan",)),
    ("global_batch_size", 0, ("global_batch_size=0",)),
    ("tokenizer.vocab_size", 0, ("tokenizer.vocab_size=0", "261 pieces")),  # pad, unk, bos, eos, newline, 256 bytes
    ("tokenizer.vocab_size", 261, ("tokenizer.vocab_size=261", "261 pieces")),
    ("model.vocab_size", 300, ("model.vocab_size=300", "tokenizer.vocab_size=512")),
]
# Several keys at once: settings that only matter together.
CONFIG_GROUP_CASES = [
    ("adam betas with sgd", {"optim.name": "sgd", "optim.b1": 0.8},
     ("optim.b1", "optim.name='sgd'", "--config.optim.name=adamw", "optim.b1=0.9")),
    ("adam eps with sgd", {"optim.name": "sgd", "optim.eps": 1e-6}, ("optim.eps", "optim.name='sgd'")),
    ("sft without a model", {"data.corpus": "sft", "data.sft_files": "experiments/data/*.jsonl"},
     ("data.corpus='sft'", "--config.init_params_from=")),
    ("sft files matching nothing", {"data.corpus": "sft", "data.sft_files": "/nonexistent/*.jsonl"},
     ("data.sft_files='/nonexistent/*.jsonl'", "matches no files")),
    ("LoRA targets matching no projection", {"model.lora_rank": 4, "init_params_from": "/tmp",
                                             "model.lora_targets": "q,attn"},
     ("model.lora_targets='q,attn'", "attn matches no projection", "q, k, v, o, mlp_in")),
    ("LoRA alpha", {"model.lora_rank": 4, "init_params_from": "/tmp", "model.lora_alpha": 0.0},
     ("model.lora_alpha=0.0",)),
    ("LoRA target named twice", {"model.lora_rank": 4, "init_params_from": "/tmp", "model.lora_targets": "q,v,q"},
     ("model.lora_targets='q,v,q'", "q more than once")),
    ("LoRA rank at the width", {"model.lora_rank": 64, "init_params_from": "/tmp"},
     ("model.lora_rank=64", "model.d_model=64")),
    ("schedule-free with a decaying schedule", {"optim.name": "schedule_free_adamw"},
     ("optim.name='schedule_free_adamw'", "optim.schedule='cosine'")),
    ("schedule-free with b1=0", {"optim.name": "schedule_free_adamw", "optim.schedule": "constant", "optim.b1": 0.0},
     ("optim.b1=0.0", "schedule_free_adamw")),
    ("lion without a learning rate", {"optim.name": "lion", "optim.learning_rate": 0.0},
     ("optim.learning_rate", "optim.name='lion'", "--config.optim.learning_rate=")),
    ("eps with lion", {"optim.name": "lion", "optim.eps": 1e-6}, ("optim.eps", "optim.name='lion'")),
    ("betas with adafactor", {"optim.name": "adafactor", "optim.b2": 0.99}, ("optim.b2", "optim.name='adafactor'")),
    ("llama KV cache over the bound", {"model.family": "llama", "model.num_kv_heads": 2, "sample.max_length": 10**8},
     ("--config.sample.max_length=100000000", "--config.sample.num_return_sequences=5", "238 GiB", "16 GiB")),
    ("harness tasks from a missing folder", {"eval_harness_tasks": "t", "eval_harness_include_path": "/nonexistent"},
     ("eval_harness_include_path='/nonexistent'",)),
    ("top_k beside greedy samples", {"sample.temperature": 0.0, "sample.top_k": 3},
     ("--config.sample.top_k", "--config.sample.temperature=0")),
    ("a count of greedy samples", {"sample.temperature": 0.0, "sample.num_return_sequences": 2},
     ("--config.sample.num_return_sequences=2", "--config.sample.temperature=0")),
    ("negative harness limit", {"eval_harness_tasks": "t", "eval_harness_limit": -1}, ("eval_harness_limit=-1",)),
    ("vocab size with a tokenizer file", {"tokenizer.path": "tok.model"},
     ("tokenizer.vocab_size", "tokenizer.path='tok.model'", "tokenizer.vocab_size=2048")),
    ("model type with a tokenizer file", {"tokenizer.path": "tok.model", "tokenizer.vocab_size": 2048,
                                          "tokenizer.model_type": "unigram"},
     ("tokenizer.model_type", "tokenizer.path='tok.model'")),
    ("tiny vocabulary without byte fallback", {"tokenizer.byte_fallback": False, "tokenizer.vocab_size": 5},
     ("tokenizer.vocab_size=5", "5 pieces")),  # pad, unk, bos, eos, newline: no byte pieces
]


def _set(config, key, value):
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value


@pytest.mark.parametrize("key, value, fragments", CONFIG_CASES, ids=[f"{c[0]}={c[1]}" for c in CONFIG_CASES])
def test_validate_refuses_bad_config(key, value, fragments):
  config = smoke_config()
  config_lib.check(config)  # the smoke config itself is fine
  _set(config, key, value)
  with raises_one_line(errors.ConfigError, *fragments):
    config_lib.check(config)


@pytest.mark.parametrize("name, overrides, fragments", CONFIG_GROUP_CASES, ids=[c[0] for c in CONFIG_GROUP_CASES])
def test_validate_refuses_settings_that_clash(name, overrides, fragments):
  del name
  config = smoke_config()
  for key, value in overrides.items():
    _set(config, key, value)
  with raises_one_line(errors.ConfigError, *fragments):
    config_lib.check(config)


@pytest.mark.parametrize("overrides", [
    {"tokenizer.model_type": "char"},  # vocab_size is not read for char (config.py says so)
    {"tokenizer.byte_fallback": False, "tokenizer.vocab_size": 6},
    {"tokenizer.vocab_size": 262, "model.vocab_size": 262},
    {"tokenizer.path": "tok.model", "tokenizer.vocab_size": 2048},
    {"init_params_from": "/tmp"},  # the base's tokenizer and dimensions replace the file's (config.with_model)
], ids=["char", "no byte fallback", "smallest with byte fallback", "tokenizer file", "base model"])
def test_validate_accepts_the_tokenizer_settings_each_mode_reads(overrides):
  config = smoke_config()
  for key, value in overrides.items():
    _set(config, key, value)
  config_lib.check(config)


def _base_workdir(tmp_path, cfg):
  """A workdir holding only what init_params_from reads before any checkpoint: the model card and its tokenizer."""
  base = tmp_path / "base"
  base.mkdir()
  (base / "tok.model").write_bytes(b"")
  workdir_lib.write_model_card(str(base), cfg, str(base / "tok.model"))
  return str(base)


def test_a_model_flag_the_base_model_replaces_is_refused_and_a_file_value_is_reported(tmp_path, capsys):
  config = smoke_config()  # the base was made from it, so its dimensions agree
  base_cfg = config_lib.check(config).model.with_vocab(512)
  base = _base_workdir(tmp_path, base_cfg)
  config.init_params_from = base
  config.model.remat_policy, config.model.lora_rank = "full", 4  # how to compute and the adapters: the run's own
  run = config_lib.resolve(config, ["model.remat_policy", "model.lora_rank", "model.d_model"])
  assert run.model == dataclasses.replace(base_cfg, remat_policy="full", lora_rank=4)
  assert run.tokenizer.path == os.path.join(base, "tok.model") and "replace" not in capsys.readouterr().out
  config.model.d_model = base_cfg.d_model * 2  # d_ff and head_dim are derived from it (4x and / num_heads)
  run = config_lib.resolve(config, ["model.remat_policy"])  # set in the file: replaced, printed
  assert run.model.d_model == base_cfg.d_model
  printed = capsys.readouterr().out
  for key, value in (("d_model", base_cfg.d_model), ("d_ff", base_cfg.d_ff), ("head_dim", base_cfg.head_dim)):
    assert f"model.{key} {value * 2} -> {value}" in printed
  with raises_one_line(errors.ConfigError, f"--config.model.d_model={base_cfg.d_model * 2}",
                       f"base model's {base_cfg.d_model}"):
    config_lib.resolve(config, ["model.d_model"])
  with raises_one_line(errors.ConfigError, "--config.tokenizer.vocab_size", "--config.init_params_from="):
    config_lib.resolve(config, ["tokenizer.vocab_size"])


def test_validate_accepts_the_settings_each_choice_reads():
  config = smoke_config()
  for key, value in {"optim.name": "sgd", "optim.momentum": 0.5, "optim.nesterov": True, "optim.schedule": "wsd",
                     "optim.decay_fraction": 0.3, "model.family": "llama", "model.num_kv_heads": 2,
                     "model.rope_theta": 5e5}.items():
    _set(config, key, value)
  config_lib.check(config)


@pytest.mark.parametrize("overrides", [
    {"optim.name": "muon", "optim.learning_rate": 0.02, "optim.adam_learning_rate": 1e-3, "optim.b1": 0.8},
    {"optim.name": "lion", "optim.b2": 0.99, "optim.lr_multipliers": "embed=0.5,head=2"},
    {"optim.name": "schedule_free_adamw", "optim.schedule": "constant", "optim.b1": 0.95},
    {"optim.name": "adafactor", "model.qk_norm": True, "model.logit_softcap": 30.0, "z_loss": 1e-4,
     "model.mlp_activation": "relu2", "model.tie_embeddings": False, "profile_steps": "2,4"},
], ids=["muon", "lion", "schedule_free_adamw", "adafactor+knobs"])
def test_validate_accepts_the_newer_optimizers_and_knobs(overrides):
  config = smoke_config()
  for key, value in overrides.items():
    _set(config, key, value)
  config_lib.check(config)


# Each names the offending flag or key with its value, and any number the check computes.
TRAIN_CASES = [
    ("unknown flag", ["--nonsense=1"], ("flag 'nonsense'",)),
    ("misspelt config key", ["--config.model.widht=3"], ("--config.model.widht=3",)),
    ("misspelt config key with a close match", ["--config.optim.learning_rat=3"],
     ("--config.optim.learning_rat=3", "did you mean optim.learning_rate?")),
    ("wrong type", ["--config.num_train_steps=abc"], ("num_train_steps", "'abc'")),
    ("missing config file", ["--config=experiments/nope.py"], ("experiments/nope.py",)),
    ("unknown variant", ["--config=experiments/smoke.py:gpt3"], ("'gpt3'",)),
    ("unknown family", ["--config.model.family=bert"], ("model.family='bert'", "gpt2, llama")),
    ("heads do not divide width", ["--config.model.num_heads=3"], ("model.num_heads=3", "model.d_model=64")),
    ("kv heads do not divide heads", ["--config.model.num_kv_heads=3"], ("model.num_kv_heads=3", "model.num_heads=4")),
    ("batch does not divide devices", ["--config.global_batch_size=12"], ("12", "data x fsdp")),
    ("accumulation does not divide batch", ["--config.grad_accum_steps=3"], ("grad_accum_steps=3",)),
    ("negative learning rate", ["--config.optim.learning_rate=-1.0"], ("optim.learning_rate=-1.0",)),
    ("unknown schedule", ["--config.optim.schedule=step"], ("optim.schedule='step'",)),
    ("max_len shorter than sequences", ["--config.model.max_len=16"], ("model.max_len=16", "data.seq_len=")),
    ("mesh larger than devices", ["--config.mesh.data=16"], ("16 devices", "8 are present")),
    ("missing text files", ["--config.data.corpus=text_files", "--config.data.text_files=/nonexistent/*.txt"],
     ("data.text_files='/nonexistent/*.txt'",)),
    ("unknown corpus", ["--config.data.corpus=wikipedia"], ("data.corpus='wikipedia'",)),
    ("tfds dataset not prepared", ["--config.data.corpus=tfds", "--config.data.tfds_name=lm1b",
                                   "--config.data.data_dir={tmp}"], ("lm1b", "{tmp}")),
    ("empty corpus", ["--config.data.corpus=text_files", "--config.data.text_files={files}/empty.txt"],
     ("{files}/empty.txt",)),
    ("non-UTF-8 file", ["--config.data.corpus=text_files", "--config.data.text_files={files}/latin1.txt"],
     ("{files}/latin1.txt", "UTF-8")),
    ("missing workdir flag", ["--workdir="], ("--workdir",)),
    ("sample setting named as its config key", ["--config.sample.top_p=0"], ("--config.sample.top_p=0",)),
    ("text files ignored by the sotu corpus", ["--config.data.text_files={files}/text.txt"],
     ("data.text_files", "data.corpus='sotu'")),
    ("infinite learning rate", ["--config.optim.learning_rate=inf"], ("optim.learning_rate=inf",)),
    ("negative min_lr_ratio", ["--config.optim.min_lr_ratio=-1"], ("optim.min_lr_ratio=-1",)),
    ("negative head_dim", ["--config.model.head_dim=-1"], ("model.head_dim=-1",)),
    ("config given twice", ["--config=experiments/smoke.py", "--config=experiments/smoke.py:llama"],
     ("--config", "2 times", "experiments/smoke.py, experiments/smoke.py:llama")),
    ("workdir is a file", ["--workdir={files}/empty.txt"], ("--workdir={files}/empty.txt",)),
    ("workdir not writable", ["--workdir={unwritable}"], ("--workdir={unwritable}",)),
    ("missing base model", ["--config.init_params_from={files}/no_run"],
     ("--config.init_params_from={files}/no_run",)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, args, fragments", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_rejects_bad_input(name, args, fragments, files, tmp_path):
  del name
  unwritable = _unwritable(tmp_path) if any("{unwritable}" in a for a in args) else ""
  args = [a.format(files=files, tmp=tmp_path, unwritable=unwritable) for a in args]
  fragments = [f.format(files=files, tmp=tmp_path, unwritable=unwritable) for f in fragments]
  workdir = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={tmp_path / 'run'}"]
  config = [] if any(a.startswith("--config=") for a in args) else [SMOKE]
  result = run_module("llm_jax.train", *config, *workdir, *args)
  assert_cli_error(result, "train", *fragments)
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_train_checks_the_prompt_length_before_training(tmp_path):
  # A char tokenizer makes the 23-character prompt 24 pieces plus BOS: over smoke.py's max_length of 24.
  result = run_module("llm_jax.train", SMOKE, f"--workdir={tmp_path / 'run'}", "--config.tokenizer.model_type=char")
  assert_cli_error(result, "train", "--config.sample.max_length=24", "(25 tokens)")
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


RESUME_CASES = [
    ("fewer steps than the checkpoint", ["--config.num_train_steps=5"], ("checkpoint 10", "num_train_steps=5")),
    ("another seed", ["--config.num_train_steps=10", "--config.seed=1"], ("seed=1", "seed=0", "--config.seed=0")),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, args, fragments", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_train_refuses_to_resume_a_checkpoint_it_would_misuse(name, args, fragments, trained, tmp_path):
  del name
  copy = _copy_run(trained, tmp_path)
  before = sorted(os.listdir(copy / "checkpoints"))
  result = run_module("llm_jax.train", SMOKE, f"--workdir={copy}", "--config.sample.max_length=20", *args)
  assert_cli_error(result, "train", *fragments)
  assert sorted(os.listdir(copy / "checkpoints")) == before


def test_resume_accepts_checkpoints_written_before_the_seed_was_recorded():
  meta = {"model": {"d_model": 64}, "tokenizer_sha256": "abc", "seed": 3}
  workdir_lib.check_resumable({"model": {"d_model": 64}, "tokenizer_sha256": "abc"}, meta, "tok.model")
  with raises_one_line(errors.RunError, "seed=3", "seed=0"):
    workdir_lib.check_resumable({"model": {"d_model": 64}, "tokenizer_sha256": "abc", "seed": 0}, meta, "tok.model")


@pytest.mark.slow
def test_sampling_failure_after_training_says_both(trained, tmp_path, monkeypatch):
  copy = _copy_run(trained, tmp_path)

  def fail(*args, **kwargs):
    raise ValueError("no room")

  monkeypatch.setattr(sampling, "generate", fail)
  with raises_one_line(errors.RunError, "checkpoint 10", "sampling", "no room") as error:
    trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=10)), str(copy))
  assert str(error.value).endswith("no room")  # the sampling error's own message, after what training did
  with open(copy / "run.json", encoding="utf-8") as f:
    assert json.load(f)["status"] == "finished"


GENERATE_CASES = [
    ("missing workdir", ["--workdir=/nonexistent/run"], ("--workdir=/nonexistent/run",)),
    ("workdir without a model", ["--workdir={tmp}"], ("model.json",)),
    ("max_length shorter than the prompt", ["--workdir={run}", "--max_length=3"], ("--max_length=3", "prompt")),
    ("max_length beyond learned positions", ["--workdir={run}", "--max_length=500"], ("--max_length=500", "64")),
    ("negative temperature", ["--workdir={run}", "--temperature=-1"], ("--temperature=-1.0",)),
    ("top_p out of range", ["--workdir={run}", "--top_p=1.5"], ("--top_p=1.5",)),
    ("no such checkpoint", ["--workdir={run}", "--checkpoint_step=7"], ("step 7",)),
    ("wrong flag type", ["--workdir={run}", "--max_length=many"], ("--max_length", "many")),
    ("nan temperature", ["--workdir={run}", "--temperature=nan"], ("--temperature=nan",)),
    ("zero max_length", ["--workdir={run}", "--max_length=0"], ("--max_length=0",)),
    ("no sequences", ["--workdir={run}", "--num_return_sequences=0"], ("--num_return_sequences=0",)),
    ("negative top_k", ["--workdir={run}", "--top_k=-1"], ("--top_k=-1",)),
    ("prompt not UTF-8", ["--workdir={run}", "--prompt=caf\udce9"], ("--prompt", "UTF-8")),
    ("top_k beside greedy decoding", ["--workdir={run}", "--temperature=0", "--top_k=5"],
     ("--top_k", "--temperature=0")),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, args, fragments", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_rejects_bad_input(name, args, fragments, trained, tmp_path):
  del name
  result = run_module("llm_jax.generate", *[a.format(run=trained, tmp=tmp_path) for a in args])
  assert_cli_error(result, "generate", *fragments)


@pytest.mark.slow
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
  assert_cli_error(result, "generate", str(model_file), "checkpoint 10")


OTHER_CASES = [
    ("evaluate", ["--workdir=/nonexistent/run"], ("--workdir=/nonexistent/run",)),
    ("evaluate", ["--workdir={run}", "--zero_shot=/nonexistent.jsonl"], ("/nonexistent.jsonl",)),
    ("evaluate", ["--workdir={run}", "--text_files=/nonexistent/*.txt"], ("/nonexistent/*.txt",)),
    ("convert", ["--workdir={tmp}"], ("--from_hf",)),
    ("convert", ["--from_hf=/nonexistent", "--workdir={tmp}"], ("--from_hf=/nonexistent",)),
    ("sweep", ["--sweep=/nonexistent.py", "--root={tmp}"], ("/nonexistent.py",)),
    ("sweep", ["--sweep=experiments/ablation_family.py", "--root=README.md"], ("--root=README.md",)),
    ("bench", ["--configs=huge"], ("'huge'",)),
    ("evaluate", ["--workdir={run}", "--batch_size=0"], ("--batch_size=0",)),
    ("evaluate", ["--workdir={run}", "--batch_size=-1"], ("--batch_size=-1",)),
    ("evaluate", ["--workdir={run}", "--seq_len=-1"], ("--seq_len=-1",)),
    ("evaluate", ["--workdir={run}", "--stride=-1"], ("--stride=-1",)),
    ("evaluate", ["--workdir={run}", "--output={unwritable}/eval.json"], ("--output={unwritable}/eval.json",)),
    ("evaluate", ["--workdir={run}", "--zero_shot=experiments/data/zero_shot_example.jsonl", "--stride=8"],
     ("--stride", "--zero_shot")),
    ("evaluate", ["--workdir={run}", "--text_files=README.md", "--split=train"], ("--split", "--text_files")),
    ("convert", ["--from_hf={tmp}", "--workdir={tmp}/run", "--checkpoint_step=3"],
     ("--checkpoint_step", "--from_hf")),
    ("bench", ["--configs=tiny", "--steps=0"], ("--steps=0",)),
    ("bench", ["--configs=tiny", "--repeats=0"], ("--repeats=0",)),
    ("bench", ["--configs=tiny", "--warmup=-1"], ("--warmup=-1",)),
    ("bench", ["--configs=tiny", "--decode=false", "--decode_lengths=64"], ("--decode_lengths", "--decode=false")),
    ("bench", ["--configs=tiny", "--json={tmp}/missing/bench.json"], ("{tmp}/missing",)),
]


@pytest.mark.slow
@pytest.mark.parametrize("program, args, fragments", OTHER_CASES,
                         ids=[f"llm_jax.{c[0]} {' '.join(c[1])}" for c in OTHER_CASES])
def test_other_entry_points_reject_bad_input(program, args, fragments, trained, tmp_path):
  unwritable = _unwritable(tmp_path) if any("{unwritable}" in a for a in args) else ""
  result = run_module(f"llm_jax.{program}", *[a.format(run=trained, tmp=tmp_path, unwritable=unwritable) for a in args])
  assert_cli_error(result, program, *[f.format(tmp=tmp_path, unwritable=unwritable) for f in fragments])
  assert not os.path.exists(os.path.join(trained, "eval_validation_10.json"))  # refused before scoring


@pytest.mark.slow
def test_train_names_the_file_and_line_of_a_bad_sft_row(trained, tmp_path):
  rows = tmp_path / "rows.jsonl"
  rows.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
  result = run_module("llm_jax.train", SMOKE, f"--workdir={tmp_path / 'run'}", "--config.data.corpus=sft",
                      f"--config.data.sft_files={rows}", f"--config.init_params_from={trained}")
  assert_cli_error(result, "train", f"{rows} line 2", "'completion'", "'messages'", "['prompt']")
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_train_refuses_a_model_flag_that_the_base_model_replaces(trained, tmp_path):
  result = run_module("llm_jax.train", SMOKE, f"--workdir={tmp_path / 'run'}", f"--config.init_params_from={trained}",
                      "--config.model.num_layers=7")
  assert_cli_error(result, "train", "--config.model.num_layers=7", "base model's 2",
                   f"--config.init_params_from={trained}")
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("value, kind", [("12345", "int 12345"), ("null", "null"), ('["a", "b"]', 'list ["a", "b"]')])
def test_a_jsonl_record_whose_text_is_not_a_string_is_named(tmp_path, value, kind):
  rows = tmp_path / "rows.jsonl"
  rows.write_text('{"text": "a first document of words"}\n' * 20 + f'{{"text": {value}}}\n')
  source = sources.TextFiles(str(rows), 0.1)
  with raises_one_line(errors.DataError, f"{rows} line 21", "data.text_field='text'", kind):
    for split in ("train", "validation"):
      list(source.documents(split))


def test_a_parquet_text_column_that_is_not_text_is_named(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  path = tmp_path / "numbers.parquet"
  pq.write_table(pa.table({"text": list(range(100))}), path)
  with raises_one_line(errors.DataError, "data.text_field='text'", str(path), "int64"):
    sources.TextFiles(str(path), 0.1)


@pytest.mark.slow
def test_a_url_with_one_slash_is_refused_not_made_a_local_folder(tmp_path):
  with raises_one_line(errors.ConfigError, "--workdir=gs:/bucket/x", "gs://bucket/x"):
    trainer.train_and_evaluate(config_lib.resolve(smoke_config()), "gs:/bucket/x")
  assert not os.path.exists("gs:")


def test_a_misspelt_name_in_a_sweep_file_is_refused(tmp_path):
  from llm_jax.sweeps import plan  # pylint: disable=import-outside-toplevel

  sweep = tmp_path / "sweep.py"
  sweep.write_text('BASE = "experiments/smoke.py"\nGRIDD = {"model.d_model": [64, 128]}\nSEED = (1,)\n')
  with raises_one_line(errors.ConfigError, "GRIDD, SEED", "BASE, SEEDS, GRID"):
    plan.load_sweep(str(sweep))


def test_a_file_that_is_not_parquet_is_named(tmp_path):
  path = tmp_path / "rows.parquet"
  path.write_text("not parquet at all")
  with raises_one_line(errors.DataError, str(path), "Parquet"):
    sources.TextFiles(str(path), 0.1)


@pytest.mark.parametrize("row, fragments", [
    ({"prompt": "a", "completion": 5}, ("rows.jsonl line 3", "'completion'", "int")),
    ({"prompt": "a", "completion": "b", "messages": [{"role": "user", "content": "x"}]},
     ("rows.jsonl line 3", "'messages'", "'prompt'/'completion'")),
])
def test_an_sft_row_of_the_wrong_shape_is_named(row, fragments):
  from llm_jax import chat  # pylint: disable=import-outside-toplevel
  from llm_jax.data import sft  # pylint: disable=import-outside-toplevel

  with raises_one_line(errors.DataError, *fragments):
    sft.render_row(row, "rows.jsonl line 3", chat.ChatTemplate(chat.DEFAULT_TEMPLATE))


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_garbage_hugging_face_config_is_named(tmp_path, content):
  from llm_jax.hf import files as hf_files  # pylint: disable=import-outside-toplevel

  (tmp_path / "config.json").write_text(content)
  with raises_one_line(errors.DataError, str(tmp_path / "config.json")) as error:
    hf_files.read_hf_config(str(tmp_path))
  assert ("JSON list" in str(error.value)) == (content == "[1, 2]")


@pytest.mark.slow
def test_chat_names_a_stdin_line_that_is_not_utf8(trained):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  result = subprocess.run([sys.executable, "-m", "llm_jax.generate", f"--workdir={trained}", "--chat",
                           "--max_length=40"], input="caf\u00e9\n".encode("latin-1"), capture_output=True,
                          check=False, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  result.stderr = result.stderr.decode()
  assert_cli_error(result, "generate", "line 1 of stdin", "UTF-8", "0xe9")


def test_a_mixture_components_wrong_text_field_names_the_components_setting(tmp_path):
  from llm_jax.data import pipeline  # pylint: disable=import-outside-toplevel

  rows = tmp_path / "rows.jsonl"
  rows.write_text('{"body": "some words of text"}\n' * 10)
  c = smoke_config()
  c.data.corpus = "mixture"
  c.data.mixture = {"sotu": {"corpus": "sotu", "weight": 0.5},
                    "web": {"corpus": "text_files", "text_files": str(rows), "weight": 0.5}}
  with raises_one_line(errors.DataError, "data.mixture.web.text_field='text'", str(rows),
                       "--config.data.mixture.web.text_field="):
    pipeline.prepare_data(config_lib.resolve(c).data, config_lib.resolve(c).tokenizer, store_dir=str(tmp_path / "s"))
  assert not (tmp_path / "s").exists()


def test_a_prompt_past_the_models_positions_is_not_told_to_raise_max_length():
  cfg = config_lib.resolve(smoke_config()).model.with_vocab(512)  # gpt2, 64 learned positions
  with raises_one_line(errors.ConfigError, "70 tokens", "64 positions") as error:
    sampling.check_request(cfg, 70, 64, 1, 0.8, 40, 0.95)
  assert "--max_length" not in str(error.value)  # raising it cannot help: the prompt alone fills the model
  with raises_one_line(errors.ConfigError, "--max_length=20", "30 tokens", "up to 64"):
    sampling.check_request(cfg, 30, 20, 1, 0.8, 40, 0.95)


def test_a_sequence_longer_than_the_base_models_positions_gets_advice_that_works(tmp_path):
  base = _base_workdir(tmp_path, config_lib.check(smoke_config()).model.with_vocab(512))  # 64 positions
  c = smoke_config(init_params_from=base)
  c.data.seq_len = 128
  with raises_one_line(errors.ConfigError, "data.seq_len=128", "64 positions",
                       "lower --config.data.seq_len to at most 64"):
    config_lib.resolve(c, ("data.seq_len",))
