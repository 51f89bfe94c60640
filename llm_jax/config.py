"""The experiment config and its resolution: `get_config()` gives the ConfigDict that experiment files and
`--config.<key>` flags speak, built from the defaults of the typed sections (llm_jax.run_config), and `resolve` turns
one into the checked, frozen `RunConfig` that everything below the entry points reads.

Where each key's default and comment live: model.* in model_config.ModelConfig, optim.* in optim.OptimConfig, data.* in
data.corpus.DataConfig, tokenizer.* in tokenizer.TokenizerConfig, mesh.* in sharding.MeshConfig, sample.* in
sampling.SampleConfig; top-level keys in steps.StepConfig, loop.LoopPlan, run_config.EvalConfig and RunConfig itself.
A field a section derives (ModelConfig.DERIVED_FIELDS, OptimConfig.DERIVED_FIELDS) is 0 in the experiment config.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Collection
from typing import Any

import ml_collections

from llm_jax import errors
from llm_jax import paths
from llm_jax import sampling
from llm_jax import sharding
from llm_jax import steps as steps_lib
from llm_jax import tokenizer as tokenizer_lib
from llm_jax import workdir as workdir_lib
from llm_jax import writers
from llm_jax.data import corpus
from llm_jax.loop import LoopPlan
from llm_jax.model_config import ModelConfig
from llm_jax.optim import OptimConfig
from llm_jax.run_config import EvalConfig
from llm_jax.run_config import RunConfig

# The sections of the experiment config, by key, and the frozen dataclass whose defaults each one takes.
SECTIONS: dict[str, type] = {"model": ModelConfig, "data": corpus.DataConfig,
                             "tokenizer": tokenizer_lib.TokenizerConfig, "optim": OptimConfig,
                             "mesh": sharding.MeshConfig, "sample": sampling.SampleConfig}
# The dataclasses whose fields with defaults are the top-level keys (StepConfig's seq_len and num_train_steps have
# none: they are data.seq_len and the loop's).
TOP_LEVEL: tuple[type, ...] = (steps_lib.StepConfig, LoopPlan, EvalConfig, RunConfig)
# The model fields a run keeps when init_params_from brings the base model's dimensions: how to compute, and adapters.
_RUN_OWN_MODEL_FIELDS = ModelConfig.RUNTIME_FIELDS + ModelConfig.ADAPTER_FIELDS


def _defaults(cls: type) -> dict[str, Any]:
  """The experiment config's defaults of dataclass `cls`: each field's default, 0 for the fields it derives."""
  derived = getattr(cls, "DERIVED_FIELDS", ())
  return {f.name: type(f.default)(0) if f.name in derived else f.default for f in dataclasses.fields(cls)
          if f.default is not dataclasses.MISSING and f.name not in ("platform", "mixture")}


def get_config() -> ml_collections.ConfigDict:
  """The defaults every experiment file starts from (a small GPT-2 on the built-in corpus)."""
  c = ml_collections.ConfigDict()
  for cls in TOP_LEVEL:
    c.update(_defaults(cls))
  for name, cls in SECTIONS.items():
    c[name] = ml_collections.ConfigDict(_defaults(cls))
  c.data.mixture = ml_collections.ConfigDict()  # {name: {'corpus': ..., 'weight': ..., its settings}}
  return c


def _take(cls: type, values: dict[str, Any], **copied: Any) -> Any:
  return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values and f.name not in copied},
             **copied)


def _sections(config: ml_collections.ConfigDict) -> RunConfig:
  """The RunConfig `config` describes (derived fields resolved, nothing read from disk), unchecked."""
  top = {k: v for k, v in config.items() if not isinstance(v, ml_collections.ConfigDict)}
  data = corpus.DataConfig.derive(config.data.to_dict())
  loop = _take(LoopPlan, top)
  return RunConfig(
      model=ModelConfig.derive(config.model.to_dict(), data.seq_len), optim=OptimConfig.derive(config.optim.to_dict()),
      data=data, tokenizer=tokenizer_lib.TokenizerConfig(**config.tokenizer.to_dict()),
      mesh=sharding.MeshConfig(**config.mesh.to_dict()), sample=sampling.SampleConfig(**config.sample.to_dict()),
      step=_take(steps_lib.StepConfig, top, seq_len=data.seq_len, num_train_steps=loop.num_train_steps), loop=loop,
      evals=_take(EvalConfig, top), **{f.name: top[f.name] for f in dataclasses.fields(RunConfig) if f.name in top})


def check(config: ml_collections.ConfigDict) -> RunConfig:
  """The RunConfig `config` describes, checked as far as the config alone allows: nothing is read from disk, so the
  files it names and the base model of init_params_from are checked by `resolve`."""
  run = _sections(config)
  run.check()
  return run


def resolve(config: ml_collections.ConfigDict, command_line_keys: Collection[str] = ()) -> RunConfig:
  """The checked RunConfig of an experiment config, with the model dimensions and tokenizer of `init_params_from`
  when it is set. Reads no data and compiles nothing; every error is one line naming the key and the fix.

  `command_line_keys` are the keys the user set by flag: one of them that the base's dimensions would replace is an
  error; a replaced value from the experiment file is printed.
  """
  run = check(config)
  # (data.text_files, each of its globs, was checked by DataConfig.check)
  for key, value in (("init_params_from", run.init_params_from), ("tokenizer.path", run.tokenizer.path),
                     ("data.store_dir", run.data.store_dir)):
    paths.check_reachable(value, f"--config.{key}")
  paths.check_local(run.data.data_dir, "--config.data.data_dir")  # TFDS reads URLs only through TensorFlow
  if not run.init_params_from:
    return run
  base, tokenizer_path = workdir_lib.read_model_card(run.init_params_from, "--config.init_params_from")
  replaced = _check_against_base(run, base, command_line_keys)
  if replaced:
    writers.console("init_params_from: the base model's dimensions replace the config's: " + ", ".join(
        f"{key} {value} -> {base_value}" for key, (value, base_value) in replaced.items()))
  kept = {key: getattr(run.model, key) for key in _RUN_OWN_MODEL_FIELDS}
  run = dataclasses.replace(run, model=dataclasses.replace(base, **kept),
                            tokenizer=tokenizer_lib.TokenizerConfig(path=tokenizer_path))
  # Only the model changed (the rest was checked above; _check_against_base checked data.seq_len against its positions).
  run.model.check()
  run.check_sample_fits()
  return run


def _check_against_base(run: RunConfig, base: ModelConfig, command_line_keys: Collection[str]) -> dict[str, tuple]:
  """Refuses a model setting given on the command line that the base model's dimensions would replace (the
  experiment file's are the recipe's and are replaced), and any tokenizer flag; returns the replaced ones as
  {'model.<field>': (the config's, the base's)}."""
  seq_len = run.data.seq_len
  errors.require(seq_len <= base.max_len, f"data.seq_len={seq_len} is longer than the {base.max_len} positions of the "
                 f"base model (--config.init_params_from={run.init_params_from}), whose dimensions the run takes; "
                 f"lower --config.data.seq_len to at most {base.max_len}")
  own = run.model.with_vocab(base.vocab_size)
  replaced = {f"model.{f.name}": (getattr(own, f.name), getattr(base, f.name)) for f in dataclasses.fields(base)
              if f.name not in _RUN_OWN_MODEL_FIELDS and getattr(own, f.name) != getattr(base, f.name)}
  for key, (value, base_value) in replaced.items():
    errors.require(key not in command_line_keys, f"--config.{key}={value} differs from the base model's {base_value} "
                   f"(--config.init_params_from={run.init_params_from}), whose dimensions the run takes; drop "
                   f"--config.{key}")
  for key in command_line_keys:
    errors.require(not key.startswith("tokenizer."), f"--config.{key} is set but --config.init_params_from="
                   f"{run.init_params_from} brings its own tokenizer, which the run keeps; drop --config.{key}")
  return replaced


def with_settings(config: ml_collections.ConfigDict, settings: dict[str, Any], where: str) -> RunConfig:
  """The RunConfig of `config` with dotted `settings` ({'optim.learning_rate': 0.01, ...}) applied, checked (without
  reading a base model); errors name `where` (a sweep file) and the settings."""
  c = ml_collections.ConfigDict(config.to_dict())
  for key, value in settings.items():
    *parents, leaf = key.split(".")
    node = c
    for parent in parents:
      node = node[parent]
    try:
      node[leaf] = value
    except (TypeError, ValueError, KeyError) as e:
      raise errors.ConfigError(f"{key}={value!r} in {where} does not fit the config ({e}); give a value of the "
                               "default's type") from e
  try:
    run = check(c)
  except errors.ConfigError as e:
    point = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    raise errors.ConfigError(f"{where}: the run with {point} is invalid: {e}") from e
  return run


def keys(config: ml_collections.ConfigDict | None = None, prefix: str = "") -> list[str]:
  """Every dotted key of `config` (default: `get_config()`), e.g. 'optim.learning_rate'."""
  out = []
  for k, v in (get_config() if config is None else config).items():
    out += keys(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) and k != "mixture" else [f"{prefix}{k}"]
  return out


def data_from_record(record: dict[str, Any]) -> corpus.DataConfig:
  """The DataConfig of a run's config.json record (`RunConfig.record`)."""
  return corpus.DataConfig.derive(record["data"])


def load_python_file(path: str, what: str, example: str) -> Any:
  """Executes a user's Python file (an experiment or sweep file) as a module; one-line errors if it cannot."""
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"{what} {path} does not exist; pass an existing file, e.g. {example}")
  module_spec = importlib.util.spec_from_file_location("llm_jax_user_file", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  # a user's file can raise anything
    raise errors.ConfigError(f"{what} {path} failed to load ({type(e).__name__}: {e}); fix the file") from e
  return module


def from_file(spec: str) -> ml_collections.ConfigDict:
  """The config an experiment file gives: 'path.py' calls get_config(), 'path.py:variant' get_config(variant)."""
  path, _, variant = spec.partition(":")
  module = load_python_file(path, "config file", "experiments/smoke.py")
  try:
    return module.get_config(variant) if variant else module.get_config()
  except errors.ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # a user's file can raise anything
    raise errors.ConfigError(f"config file {spec} does not give a config ({type(e).__name__}: {e})") from e
