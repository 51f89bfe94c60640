"""Every entry point answers bad input with one line naming the problem, before any long compile."""

import dataclasses
import json
import os
import shutil

import pytest
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


def _one_line(result, fragment):
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]


# Config values validate() refuses before anything runs: checked in-process (a subprocess each would cost ~3 s;
# the train cases below show the same errors reach the command line as one line).
CONFIG_CASES = [
    ("sample.top_p", 0.0, "--config.sample.top_p=0.0 is outside (0, 1]"),
    ("sample.top_k", -1, "--config.sample.top_k=-1 is negative"),
    ("sample.temperature", -1.0, "--config.sample.temperature=-1.0 is negative"),
    ("sample.temperature", float("nan"), "--config.sample.temperature=nan is not a finite number"),
    ("sample.num_return_sequences", 0, "--config.sample.num_return_sequences=0 must be at least 1"),
    ("sample.max_length", 1, "--config.sample.max_length=1 leaves no room to generate"),
    ("sample.max_length", 65, "--config.sample.max_length=65 exceeds the 64 learned positions"),
    ("sample.prompt", "caf\udce9", "--config.sample.prompt is not valid UTF-8"),
    ("data.text_files", "*.txt", "data.text_files is set but data.corpus='sotu' ignores it; pass "
     "--config.data.corpus=text_files (or clear data.text_files)"),
    ("data.tfds_name", "lm1b", "data.tfds_name is set but data.corpus='sotu' ignores it; pass "
     "--config.data.corpus=tfds"),
    ("optim.momentum", 0.5, "optim.momentum is set but optim.name='adamw' ignores it; pass --config.optim.name=sgd"),
    ("optim.nesterov", True, "optim.nesterov is set but optim.name='adamw' ignores it"),
    ("optim.decay_fraction", 0.3, "optim.decay_fraction is set but optim.schedule='cosine' ignores it; pass "
     "--config.optim.schedule=wsd (or restore optim.decay_fraction=0.2)"),
    ("model.rope_theta", 5e5, "model.rope_theta is set but model.family='gpt2' ignores it"),
    ("model.rope_scaling_factor", 8.0, "model.rope_scaling_factor is set but model.family='gpt2' ignores it"),
    ("optim.min_lr_ratio", -1.0, "optim.min_lr_ratio=-1.0 must be in [0, 1]"),
    ("optim.min_lr_ratio", 1.5, "optim.min_lr_ratio=1.5 must be in [0, 1]"),
    ("model.head_dim", -1, "model.head_dim=-1 must be >= 0 (0: derived)"),
    ("model.d_ff", -5, "model.d_ff=-5 must be >= 0"),
    ("model.num_kv_heads", -2, "model.num_kv_heads=-2 must be >= 0"),
    ("model.max_len", -1, "model.max_len=-1 must be >= 0"),
    ("model.vocab_size", -3, "model.vocab_size=-3 must be >= 0"),
    ("optim.learning_rate", float("inf"), "optim.learning_rate=inf must be positive and finite"),
    ("optim.learning_rate", float("nan"), "optim.learning_rate=nan must be positive and finite"),
    ("optim.weight_decay", -0.1, "optim.weight_decay=-0.1 must be >= 0"),
    ("optim.grad_clip_norm", -1.0, "optim.grad_clip_norm=-1.0 must be >= 0"),
    ("optim.warmup_steps", 31, "optim.warmup_steps=31 is longer than the run (num_train_steps=30)"),
    ("data.validation_fraction", 0.0, "data.validation_fraction=0.0 must be in (0, 1)"),
    ("data.validation_fraction", 1.0, "data.validation_fraction=1.0 must be in (0, 1)"),
    ("data.validation_fraction", 0.3, "data.validation_fraction is set but data.corpus='sotu' ignores it"),
    ("eval_harness_limit", 5, "eval_harness_limit is set but no eval_harness_tasks are"),
    ("eval_harness_include_path", "tests", "eval_harness_include_path is set but no eval_harness_tasks are"),
    ("extra_eval_every", 5, "extra_eval_every is set but there are no eval_text_files, eval_zero_shot_files or "
     "eval_harness_tasks"),
    ("extra_eval_every", -1, "extra_eval_every=-1 must be >= 0"),
    ("data.sft_files", "rows.jsonl", "data.sft_files is set but data.corpus='sotu' ignores it; pass "
     "--config.data.corpus=sft"),
    ("data.train_on_prompt", True, "data.train_on_prompt is set but data.corpus='sotu' ignores it"),
    ("data.corpus", "sft", "data.corpus='sft' needs --config.data.sft_files="),
    ("model.lora_rank", 4, "model.lora_rank=4 must be 0 (off) or positive with --config.init_params_from=WORKDIR"),
    ("model.lora_rank", -1, "model.lora_rank=-1 must be 0 (off)"),
    ("model.lora_targets", "q,o", "model.lora_targets is set but model.lora_rank=0 ignores it"),
    ("optim.adam_learning_rate", 1e-3, "optim.adam_learning_rate is set but optim.name='adamw' ignores it; pass "
     "--config.optim.name=muon"),
    ("optim.lr_multipliers", "embed", "optim.lr_multipliers entry 'embed' is not group=factor"),
    ("optim.lr_multipliers", "layers=2", "optim.lr_multipliers entry 'layers=2' is not group=factor"),
    ("model.logit_softcap", -1.0, "model.logit_softcap=-1.0 must be >= 0"),
    ("model.mlp_activation", "swish", "model.mlp_activation='swish' is not one of default, relu2"),
    ("z_loss", -1e-4, "z_loss=-0.0001 must be >= 0"),
    ("z_loss", float("nan"), "z_loss=nan must be >= 0 and finite"),
    ("global_batch_size", 0, "global_batch_size=0 must be positive"),
    ("tokenizer.vocab_size", 0, "tokenizer.vocab_size=0 leaves no room for learned pieces: 261 pieces are fixed "
     "(pad, unk, bos, eos, newline and 256 byte-fallback pieces); pass e.g. --config.tokenizer.vocab_size=2048"),
    ("tokenizer.vocab_size", 261, "tokenizer.vocab_size=261 leaves no room"),
    ("model.vocab_size", 300, "model.vocab_size=300 is smaller than tokenizer.vocab_size=512"),
]
# Several keys at once: settings that only matter together.
CONFIG_GROUP_CASES = [
    ("adam betas with sgd", {"optim.name": "sgd", "optim.b1": 0.8}, "optim.b1 is set but optim.name='sgd' ignores "
     "it; pass --config.optim.name=adamw (or restore optim.b1=0.9)"),
    ("adam eps with sgd", {"optim.name": "sgd", "optim.eps": 1e-6}, "optim.eps is set but optim.name='sgd'"),
    ("sft without a model", {"data.corpus": "sft", "data.sft_files": "experiments/data/*.jsonl"},
     "data.corpus='sft' fine-tunes a model and keeps its tokenizer: pass --config.init_params_from=WORKDIR"),
    ("sft files matching nothing", {"data.corpus": "sft", "data.sft_files": "/nonexistent/*.jsonl"},
     "data.sft_files='/nonexistent/*.jsonl' matches no files"),
    ("LoRA targets matching no projection", {"model.lora_rank": 4, "init_params_from": "/tmp",
                                             "model.lora_targets": "q,attn"},
     "model.lora_targets='q,attn': attn matches no projection; use comma-separated names from q, k, v, o, mlp_in"),
    ("LoRA alpha", {"model.lora_rank": 4, "init_params_from": "/tmp", "model.lora_alpha": 0.0},
     "model.lora_alpha=0.0 must be positive"),
    ("LoRA target named twice", {"model.lora_rank": 4, "init_params_from": "/tmp", "model.lora_targets": "q,v,q"},
     "model.lora_targets='q,v,q' names q more than once"),
    ("LoRA rank at the width", {"model.lora_rank": 64, "init_params_from": "/tmp"},
     "model.lora_rank=64 is not below model.d_model=64"),
    ("schedule-free with a decaying schedule", {"optim.name": "schedule_free_adamw"},
     "optim.name='schedule_free_adamw' replaces the learning-rate decay, but optim.schedule='cosine'"),
    ("schedule-free with b1=0", {"optim.name": "schedule_free_adamw", "optim.schedule": "constant", "optim.b1": 0.0},
     "optim.b1=0.0 must be in (0, 1) for schedule_free_adamw"),
    ("lion without a learning rate", {"optim.name": "lion", "optim.learning_rate": 0.0},
     "optim.learning_rate is unset and optim.name='lion' has no measured default rate; pass "
     "--config.optim.learning_rate=<peak rate> (the measured ones: muon 0.02, adamw 0.003)"),
    ("eps with lion", {"optim.name": "lion", "optim.eps": 1e-6}, "optim.eps is set but optim.name='lion' ignores it"),
    ("betas with adafactor", {"optim.name": "adafactor", "optim.b2": 0.99}, "optim.b2 is set but optim.name="
     "'adafactor' ignores it"),
    ("llama KV cache over the bound", {"model.family": "llama", "model.num_kv_heads": 2,
                                       "sample.max_length": 10**8}, "KV cache, over the 16 GiB bound"),
    ("harness tasks from a missing folder", {"eval_harness_tasks": "t", "eval_harness_include_path": "/nonexistent"},
     "eval_harness_include_path='/nonexistent' is not a folder"),
    ("top_k beside greedy samples", {"sample.temperature": 0.0, "sample.top_k": 3}, "--config.sample.top_k is set but "
     "greedy decoding (--config.sample.temperature=0) ignores it"),
    ("a count of greedy samples", {"sample.temperature": 0.0, "sample.num_return_sequences": 2},
     "--config.sample.num_return_sequences=2 would repeat the one continuation of greedy decoding"),
    ("negative harness limit", {"eval_harness_tasks": "t", "eval_harness_limit": -1},
     "eval_harness_limit=-1 must be >= 0"),
    ("vocab size with a tokenizer file", {"tokenizer.path": "tok.model"}, "tokenizer.vocab_size is set but "
     "tokenizer.path='tok.model' ignores it; pass --config.tokenizer.path='' to train one (or restore "
     "tokenizer.vocab_size=2048)"),
    ("model type with a tokenizer file", {"tokenizer.path": "tok.model", "tokenizer.vocab_size": 2048,
                                          "tokenizer.model_type": "unigram"}, "tokenizer.model_type is set but "
     "tokenizer.path='tok.model'"),
    ("tiny vocabulary without byte fallback", {"tokenizer.byte_fallback": False, "tokenizer.vocab_size": 5},
     "tokenizer.vocab_size=5 leaves no room for learned pieces: 5 pieces are fixed (pad, unk, bos, eos, "
     "newline);"),
]


def _set(config, key, value):
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value


@pytest.mark.parametrize("key, value, fragment", CONFIG_CASES, ids=[f"{c[0]}={c[1]}" for c in CONFIG_CASES])
def test_validate_refuses_bad_config(key, value, fragment):
  config = smoke_config()
  config_lib.check(config)  # the smoke config itself is fine
  _set(config, key, value)
  with pytest.raises(errors.ConfigError) as err:
    config_lib.check(config)
  assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name, overrides, fragment", CONFIG_GROUP_CASES, ids=[c[0] for c in CONFIG_GROUP_CASES])
def test_validate_refuses_settings_that_clash(name, overrides, fragment):
  del name
  config = smoke_config()
  for key, value in overrides.items():
    _set(config, key, value)
  with pytest.raises(errors.ConfigError) as err:
    config_lib.check(config)
  assert fragment in str(err.value) and "\n" not in str(err.value)


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
  with pytest.raises(errors.ConfigError, match=r"^--config.model.d_model=\d+ differs from the base model's "):
    config_lib.resolve(config, ["model.d_model"])
  with pytest.raises(errors.ConfigError, match=r"^--config.tokenizer.vocab_size is set but --config.init_params_from="):
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


TRAIN_CASES = [
    ("unknown flag", ["--nonsense=1"], "Unknown command line flag 'nonsense'"),
    ("misspelt config key", ["--config.model.widht=3"], "unknown config key in --config.model.widht=3; check"),
    ("misspelt config key with a close match", ["--config.optim.learning_rat=3"],
     "unknown config key in --config.optim.learning_rat=3 (did you mean optim.learning_rate?); check its spelling"),
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
    ("sample setting named as its config key", ["--config.sample.top_p=0"], "--config.sample.top_p=0"),
    ("text files ignored by the sotu corpus", ["--config.data.text_files={files}/text.txt"],
     "data.text_files is set but data.corpus='sotu' ignores it"),
    ("infinite learning rate", ["--config.optim.learning_rate=inf"], "optim.learning_rate=inf must be positive"),
    ("negative min_lr_ratio", ["--config.optim.min_lr_ratio=-1"], "optim.min_lr_ratio=-1"),
    ("negative head_dim", ["--config.model.head_dim=-1"], "model.head_dim=-1 must be >= 0"),
    ("config given twice", ["--config=experiments/smoke.py", "--config=experiments/smoke.py:llama"],
     "--config is given 2 times (experiments/smoke.py, experiments/smoke.py:llama)"),
    ("workdir is a file", ["--workdir={files}/empty.txt"], "--workdir={files}/empty.txt is a file"),
    ("workdir not writable", ["--workdir={unwritable}"], "--workdir={unwritable} is not writable"),
    ("missing base model", ["--config.init_params_from={files}/no_run"],
     "--config.init_params_from={files}/no_run does not exist; pass the directory a training run wrote"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, args, fragment", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_rejects_bad_input(name, args, fragment, files, tmp_path):
  del name
  unwritable = _unwritable(tmp_path) if any("{unwritable}" in a for a in args) else ""
  args = [a.format(files=files, tmp=tmp_path, unwritable=unwritable) for a in args]
  fragment = fragment.format(files=files, unwritable=unwritable)
  workdir = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={tmp_path / 'run'}"]
  config = [] if any(a.startswith("--config=") for a in args) else [SMOKE]
  result = run_module("llm_jax.train", *config, *workdir, *args)
  _one_line(result, fragment)
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_train_checks_the_prompt_length_before_training(tmp_path):
  # A char tokenizer makes the 23-character prompt 24 pieces plus BOS: over smoke.py's max_length of 24.
  result = run_module("llm_jax.train", SMOKE, f"--workdir={tmp_path / 'run'}", "--config.tokenizer.model_type=char")
  _one_line(result, "--config.sample.max_length=24 is not longer than the prompt (25 tokens); raise "
            "--config.sample.max_length")
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


RESUME_CASES = [
    ("fewer steps than the checkpoint", ["--config.num_train_steps=5"],
     "the workdir already holds checkpoint 10, past num_train_steps=5; raise num_train_steps or use another --workdir"),
    ("another seed", ["--config.num_train_steps=10", "--config.seed=1"],
     "seed=1 differs from the checkpoint's seed=0; the data order and dropout would change; pass --config.seed=0 "
     "or use another --workdir"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, args, fragment", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_train_refuses_to_resume_a_checkpoint_it_would_misuse(name, args, fragment, trained, tmp_path):
  del name
  copy = _copy_run(trained, tmp_path)
  before = sorted(os.listdir(copy / "checkpoints"))
  result = run_module("llm_jax.train", SMOKE, f"--workdir={copy}", "--config.sample.max_length=20", *args)
  _one_line(result, fragment)
  assert sorted(os.listdir(copy / "checkpoints")) == before


def test_resume_accepts_checkpoints_written_before_the_seed_was_recorded():
  meta = {"model": {"d_model": 64}, "tokenizer_sha256": "abc", "seed": 3}
  workdir_lib.check_resumable({"model": {"d_model": 64}, "tokenizer_sha256": "abc"}, meta, "tok.model")
  with pytest.raises(errors.RunError, match="seed=3 differs from the checkpoint's seed=0"):
    workdir_lib.check_resumable({"model": {"d_model": 64}, "tokenizer_sha256": "abc", "seed": 0}, meta, "tok.model")


@pytest.mark.slow
def test_sampling_failure_after_training_says_both(trained, tmp_path, monkeypatch):
  copy = _copy_run(trained, tmp_path)

  def fail(*args, **kwargs):
    raise ValueError("no room")

  monkeypatch.setattr(sampling, "generate", fail)
  with pytest.raises(errors.RunError, match=r"^training finished \(checkpoint 10\); sampling failed: no room$"):
    trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=10)), str(copy))
  with open(copy / "run.json", encoding="utf-8") as f:
    assert json.load(f)["status"] == "finished"


GENERATE_CASES = [
    ("missing workdir", ["--workdir=/nonexistent/run"], "does not exist"),
    ("workdir without a model", ["--workdir={tmp}"], "model.json is missing"),
    ("max_length shorter than the prompt", ["--workdir={run}", "--max_length=3"], "is not longer than the prompt"),
    ("max_length beyond learned positions", ["--workdir={run}", "--max_length=500"], "learned positions"),
    ("negative temperature", ["--workdir={run}", "--temperature=-1"], "--temperature=-1.0 is negative"),
    ("top_p out of range", ["--workdir={run}", "--top_p=1.5"], "--top_p=1.5 is outside (0, 1]"),
    ("no such checkpoint", ["--workdir={run}", "--checkpoint_step=7"], "no checkpoint at step 7"),
    ("wrong flag type", ["--workdir={run}", "--max_length=many"], "--max_length"),
    ("nan temperature", ["--workdir={run}", "--temperature=nan"], "--temperature=nan is not a finite number"),
    ("zero max_length", ["--workdir={run}", "--max_length=0"], "--max_length=0 leaves no room to generate"),
    ("no sequences", ["--workdir={run}", "--num_return_sequences=0"], "--num_return_sequences=0 must be at least 1"),
    ("negative top_k", ["--workdir={run}", "--top_k=-1"], "--top_k=-1 is negative"),
    ("prompt not UTF-8", ["--workdir={run}", "--prompt=caf\udce9"], "--prompt is not valid UTF-8"),
    ("top_k beside greedy decoding", ["--workdir={run}", "--temperature=0", "--top_k=5"],
     "--top_k is set but greedy decoding (--temperature=0) ignores it"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, args, fragment", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_rejects_bad_input(name, args, fragment, trained, tmp_path):
  del name
  result = run_module("llm_jax.generate", *[a.format(run=trained, tmp=tmp_path) for a in args])
  _one_line(result, fragment)


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
  assert result.returncode == 2
  assert "is not the one checkpoint" in result.stderr


OTHER_CASES = [
    ("llm_jax.evaluate", ["--workdir=/nonexistent/run"], "does not exist"),
    ("llm_jax.evaluate", ["--workdir={run}", "--zero_shot=/nonexistent.jsonl"], "zero-shot file"),
    ("llm_jax.evaluate", ["--workdir={run}", "--text_files=/nonexistent/*.txt"], "matches no files"),
    ("llm_jax.convert", ["--workdir={tmp}"], "pass exactly one of --from_hf"),
    ("llm_jax.convert", ["--from_hf=/nonexistent", "--workdir={tmp}"], "is not a directory"),
    ("llm_jax.sweep", ["--sweep=/nonexistent.py", "--root={tmp}"], "sweep file /nonexistent.py does not exist"),
    ("llm_jax.sweep", ["--sweep=experiments/ablation_family.py", "--root=README.md"], "--root=README.md is a file"),
    ("llm_jax.bench", ["--configs=huge"], "unknown bench config 'huge'"),
    ("llm_jax.evaluate", ["--workdir={run}", "--batch_size=0"], "--batch_size=0 must be at least 1"),
    ("llm_jax.evaluate", ["--workdir={run}", "--batch_size=-1"], "--batch_size=-1 must be at least 1"),
    ("llm_jax.evaluate", ["--workdir={run}", "--seq_len=-1"], "--seq_len=-1 must be >= 0"),
    ("llm_jax.evaluate", ["--workdir={run}", "--stride=-1"], "--stride=-1 must be >= 0"),
    ("llm_jax.evaluate", ["--workdir={run}", "--output={unwritable}/eval.json"], "cannot write --output="),
    ("llm_jax.evaluate", ["--workdir={run}", "--zero_shot=experiments/data/zero_shot_example.jsonl", "--stride=8"],
     "--stride is set but --zero_shot scores whole items and ignores it; drop --stride"),
    ("llm_jax.evaluate", ["--workdir={run}", "--text_files=README.md", "--split=train"],
     "--split is set but --text_files evaluates those files instead and ignores it; drop --split"),
    ("llm_jax.convert", ["--from_hf={tmp}", "--workdir={tmp}/run", "--checkpoint_step=3"],
     "--checkpoint_step is set but --from_hf writes a new workdir and ignores it"),
    ("llm_jax.bench", ["--configs=tiny", "--steps=0"], "--steps=0 must be at least 1"),
    ("llm_jax.bench", ["--configs=tiny", "--repeats=0"], "--repeats=0 must be at least 1"),
    ("llm_jax.bench", ["--configs=tiny", "--warmup=-1"], "--warmup=-1 must be at least 0"),
    ("llm_jax.bench", ["--configs=tiny", "--decode=false", "--decode_lengths=64"],
     "--decode_lengths is ignored with --decode=false"),
    ("llm_jax.bench", ["--configs=tiny", "--json={tmp}/missing/bench.json"], "directory {tmp}/missing does not exist"),
]


@pytest.mark.slow
@pytest.mark.parametrize("module, args, fragment", OTHER_CASES, ids=[f"{c[0]} {c[2]}" for c in OTHER_CASES])
def test_other_entry_points_reject_bad_input(module, args, fragment, trained, tmp_path):
  unwritable = _unwritable(tmp_path) if any("{unwritable}" in a for a in args) else ""
  result = run_module(module, *[a.format(run=trained, tmp=tmp_path, unwritable=unwritable) for a in args])
  _one_line(result, fragment.format(tmp=tmp_path))
  assert not os.path.exists(os.path.join(trained, "eval_validation_10.json"))  # refused before scoring


@pytest.mark.slow
def test_train_names_the_file_and_line_of_a_bad_sft_row(trained, tmp_path):
  rows = tmp_path / "rows.jsonl"
  rows.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
  result = run_module("llm_jax.train", SMOKE, f"--workdir={tmp_path / 'run'}", "--config.data.corpus=sft",
                      f"--config.data.sft_files={rows}", f"--config.init_params_from={trained}")
  _one_line(result, f"{rows} line 2 has neither 'completion' nor 'messages' (it has ['prompt'])")
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_train_refuses_a_model_flag_that_the_base_model_replaces(trained, tmp_path):
  result = run_module("llm_jax.train", SMOKE, f"--workdir={tmp_path / 'run'}", f"--config.init_params_from={trained}",
                      "--config.model.num_layers=7")
  _one_line(result, f"--config.model.num_layers=7 differs from the base model's 2 (--config.init_params_from="
            f"{trained}), whose dimensions the run takes; drop --config.model.num_layers")
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("value, kind", [("12345", "int 12345"), ("null", "null"), ('["a", "b"]', 'list ["a", "b"]')])
def test_a_jsonl_record_whose_text_is_not_a_string_is_named(tmp_path, value, kind):
  rows = tmp_path / "rows.jsonl"
  rows.write_text('{"text": "a first document of words"}\n' * 20 + f'{{"text": {value}}}\n')
  source = sources.TextFiles(str(rows), 0.1)
  with pytest.raises(ValueError, match=r"^[^\n]*$") as error:
    for split in ("train", "validation"):
      list(source.documents(split))
  assert f"{rows} line 21: data.text_field='text' is {kind}, not text" in str(error.value)


def test_a_parquet_text_column_that_is_not_text_is_named(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  path = tmp_path / "numbers.parquet"
  pq.write_table(pa.table({"text": list(range(100))}), path)
  with pytest.raises(ValueError, match=f"data.text_field='text' of {path} is a int64 column, not text"):
    sources.TextFiles(str(path), 0.1)


@pytest.mark.slow
def test_a_url_with_one_slash_is_refused_not_made_a_local_folder(tmp_path):
  with pytest.raises(ValueError, match=r"--workdir=gs:/bucket/x is a URL with one slash .* write gs://bucket/x$"):
    trainer.train_and_evaluate(config_lib.resolve(smoke_config()), "gs:/bucket/x")
  assert not os.path.exists("gs:")


def test_a_misspelt_name_in_a_sweep_file_is_refused(tmp_path):
  from llm_jax.sweeps import plan  # pylint: disable=import-outside-toplevel

  sweep = tmp_path / "sweep.py"
  sweep.write_text('BASE = "experiments/smoke.py"\nGRIDD = {"model.d_model": [64, 128]}\nSEED = (1,)\n')
  with pytest.raises(ValueError, match="sets GRIDD, SEED, which a sweep does not read; it reads BASE, SEEDS, GRID"):
    plan.load_sweep(str(sweep))


def test_a_file_that_is_not_parquet_is_named(tmp_path):
  path = tmp_path / "rows.parquet"
  path.write_text("not parquet at all")
  with pytest.raises(ValueError, match=f"^{path} is not a readable Parquet file"):
    sources.TextFiles(str(path), 0.1)


@pytest.mark.parametrize("row, fragment", [
    ({"prompt": "a", "completion": 5}, "rows.jsonl line 3: 'completion' must be a string, not int"),
    ({"prompt": "a", "completion": "b", "messages": [{"role": "user", "content": "x"}]},
     "rows.jsonl line 3 has both 'messages' and 'prompt'/'completion'"),
])
def test_an_sft_row_of_the_wrong_shape_is_named(row, fragment):
  from llm_jax import chat  # pylint: disable=import-outside-toplevel
  from llm_jax.data import sft  # pylint: disable=import-outside-toplevel

  with pytest.raises(ValueError, match=r"^[^\n]*$") as error:
    sft.render_row(row, "rows.jsonl line 3", chat.ChatTemplate(chat.DEFAULT_TEMPLATE))
  assert fragment in str(error.value)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_garbage_hugging_face_config_is_named(tmp_path, content):
  from llm_jax.hf import files as hf_files  # pylint: disable=import-outside-toplevel

  (tmp_path / "config.json").write_text(content)
  with pytest.raises(ValueError, match=f"^{tmp_path / 'config.json'} (is not valid JSON|holds a JSON list)"):
    hf_files.read_hf_config(str(tmp_path))


@pytest.mark.slow
def test_chat_names_a_stdin_line_that_is_not_utf8(trained):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  result = subprocess.run([sys.executable, "-m", "llm_jax.generate", f"--workdir={trained}", "--chat",
                           "--max_length=40"], input="caf\u00e9\n".encode("latin-1"), capture_output=True,
                          check=False, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  stderr = result.stderr.decode()
  assert result.returncode == 2, stderr[-2000:]
  assert len(stderr.strip().splitlines()) == 1 and "line 1 of stdin is not UTF-8 text (byte 0xe9" in stderr


def test_a_mixture_components_wrong_text_field_names_the_components_setting(tmp_path):
  from llm_jax.data import pipeline  # pylint: disable=import-outside-toplevel

  rows = tmp_path / "rows.jsonl"
  rows.write_text('{"body": "some words of text"}\n' * 10)
  c = smoke_config()
  c.data.corpus = "mixture"
  c.data.mixture = {"sotu": {"corpus": "sotu", "weight": 0.5},
                    "web": {"corpus": "text_files", "text_files": str(rows), "weight": 0.5}}
  with pytest.raises(ValueError, match=r"data.mixture.web.text_field='text' is not a field of .* pass "
                     r"--config.data.mixture.web.text_field=\.\.\.$"):
    pipeline.prepare_data(config_lib.resolve(c).data, config_lib.resolve(c).tokenizer, store_dir=str(tmp_path / "s"))
  assert not (tmp_path / "s").exists()


def test_a_prompt_past_the_models_positions_is_not_told_to_raise_max_length():
  cfg = config_lib.resolve(smoke_config()).model.with_vocab(512)  # gpt2, 64 learned positions
  with pytest.raises(ValueError, match=r"^the prompt \(70 tokens, a chat's whole conversation\) fills all 64 "
                     r"positions of this model; shorten it"):
    sampling.check_request(cfg, 70, 64, 1, 0.8, 40, 0.95)
  with pytest.raises(ValueError, match=r"--max_length=20 is not longer than the prompt \(30 tokens\); raise "
                     r"--max_length \(up to 64, this model's positions\)$"):
    sampling.check_request(cfg, 30, 20, 1, 0.8, 40, 0.95)


def test_a_sequence_longer_than_the_base_models_positions_gets_advice_that_works(tmp_path):
  base = _base_workdir(tmp_path, config_lib.check(smoke_config()).model.with_vocab(512))  # 64 positions
  c = smoke_config(init_params_from=base)
  c.data.seq_len = 128
  with pytest.raises(errors.ConfigError, match=r"data.seq_len=128 is longer than the 64 positions of the base "
                     r"model .* lower --config.data.seq_len to at most 64$"):
    config_lib.resolve(c, ("data.seq_len",))
