"""A run's workdir: the name of every file and folder in it, its run config and model card, the checkpoint
metadata and every check of it (its data-stream record is built by `resume`), pins of checkpoints other runs need,
and loading a trained or converted model from it.

    config.json          the resolved llm_jax config of the run (not a Hugging Face config.json); its model section
                         names model.json instead of copying it
    model.json           the model card, the workdir's one record of the model: ModelConfig and the tokenizer's
                         path, all `generate`/`evaluate` need (and, for LoRA runs, the base model the adapters belong
                         to: `lora_base_reference`). Each checkpoint's metadata keeps the dimensions it was saved with,
                         so a checkpoint copied away still describes itself and a hand-edited card is caught
                         (`check_model_card`)
    metrics.jsonl        one JSON object per logged step (`writers`)
    run.json             the run card: how it ran (code, packages, devices), when, how it ended (`sweeps.runcard`)
    .lock                held while a run trains (`faults.WorkdirLock`; none on an object store)
    checkpoints/         orbax checkpoints (`checkpoint.Checkpointer`); unusable ones move to unusable_checkpoints/
    tokenizer/           trained tokenizers, cached per corpus and settings
    data_store.json      which shared token stores (data.store_dir; one per source) the run read
    pinned_checkpoints.json  steps of checkpoints/ that other runs depend on (LoRA adapters' base), kept through
                         rotation (`pin_checkpoint`)
    tensorboard/         TensorBoard event files

The workdir may be a local folder or an object-store URL (gs://...): every file goes through `paths`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any
from typing import Sequence

import flax.linen as nn
import jax

from llm_jax import checkpoint as checkpoint_lib
from llm_jax import errors
from llm_jax import lora
from llm_jax import paths
from llm_jax import sharding
from llm_jax.hf.tokenizer import HFTokenizer
from llm_jax.model import abstract_params
from llm_jax.model_config import ModelConfig
from llm_jax.model_config import check_vocab_fits
from llm_jax.tokenizer import Tokenizer
from llm_jax.tokenizer import load_tokenizer

RUN_CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
CHECKPOINT_DIR = "checkpoints"
UNUSABLE_CHECKPOINT_DIR = os.path.basename(checkpoint_lib.unusable_dir(CHECKPOINT_DIR))
TOKENIZER_DIR = "tokenizer"
DATA_STORE_FILE = "data_store.json"
PINS_FILE = "pinned_checkpoints.json"
TENSORBOARD_DIR = "tensorboard"


def path(workdir: str, name: str) -> str:
  """The path of file or folder `name` (one of the constants above) in `workdir`."""
  return os.path.join(workdir, name)


def checkpoint_dir(workdir: str) -> str:
  """Absolute (a URL as it is), so orbax and the checkpoint messages see the same path wherever the process runs."""
  return os.path.join(paths.absolute(workdir), CHECKPOINT_DIR)


def lock_path(workdir: str) -> str:
  return path(workdir, LOCK_FILE)


def write_run_config(workdir: str, record: dict[str, Any]) -> None:
  """Writes the run's resolved config (`RunConfig.record()`), its model section replaced by the name of the model
  card, model.json, which is the workdir's one record of the model."""
  record = {**record, "model": MODEL_FILE}
  paths.as_path(path(workdir, RUN_CONFIG_FILE)).write_text(json.dumps(record, indent=2), encoding="utf-8")


def has_run_config(workdir: str) -> bool:
  return paths.as_path(path(workdir, RUN_CONFIG_FILE)).is_file()


def read_run_config(workdir: str) -> dict[str, Any]:
  """The resolved config (`RunConfig.record()`) a training run wrote into `workdir`, its model section read from
  the model card."""
  config_path = path(workdir, RUN_CONFIG_FILE)
  if not paths.as_path(config_path).is_file():
    raise errors.MissingFileError(f"{config_path} is missing; --workdir must be a directory written by llm_jax.train")
  record = json.loads(paths.as_path(config_path).read_text(encoding="utf-8"))
  if record.get("model") == MODEL_FILE:
    record["model"] = json.loads(paths.as_path(path(workdir, MODEL_FILE)).read_text(encoding="utf-8"))["model"]
  return record


def write_data_store(workdir: str, store_paths: Sequence[str]) -> None:
  """Records the token stores (paths and fingerprints; one per source, in mixture order) the run trained on; the
  stores themselves are shared."""
  stores = [{"store": paths.absolute(p), "fingerprint": os.path.basename(p)} for p in store_paths]
  paths.as_path(path(workdir, DATA_STORE_FILE)).write_text(json.dumps({"stores": stores}, indent=2), encoding="utf-8")


def write_model_card(workdir: str, cfg: ModelConfig, tokenizer_path: str,
                     lora_base: dict[str, Any] | None = None) -> None:
  """What `generate` and `evaluate` need to rebuild the model without the experiment config."""
  card = {"model": dataclasses.asdict(cfg), "tokenizer": os.path.relpath(tokenizer_path, workdir)}
  if lora_base is not None:
    card["lora_base"] = lora_base
  paths.as_path(path(workdir, MODEL_FILE)).write_text(json.dumps(card, indent=2), encoding="utf-8")


def read_model_card(workdir: str, flag: str = "--workdir") -> tuple[ModelConfig, str]:
  """(model config, tokenizer path) from the workdir's model.json; errors name `flag`, where the path came from."""
  card_path = path(workdir, MODEL_FILE)
  if not paths.as_path(workdir).is_dir():
    raise errors.MissingFileError(f"{flag}={workdir} does not exist; pass the directory a training run wrote")
  if not paths.as_path(card_path).exists():
    raise errors.MissingFileError(f"{card_path} is missing; {flag} must be a directory written by llm_jax.train or "
                                  "llm_jax.convert")
  card = json.loads(paths.as_path(card_path).read_text(encoding="utf-8"))
  return ModelConfig(**card["model"]), os.path.join(workdir, card["tokenizer"])


def read_lora_base(workdir: str) -> dict[str, Any] | None:
  """The base model reference a LoRA run's model card holds, or None."""
  return json.loads(paths.as_path(path(workdir, MODEL_FILE)).read_text(encoding="utf-8")).get("lora_base")


def pin_checkpoint(workdir: str, step: int, by: str) -> None:
  """Records in `workdir` that run `by` depends on its checkpoint `step`, so that its rotation keeps it
  (`checkpoint.Checkpointer(pins=...)`). A workdir that cannot be written gets a warning line: the pin is then the
  user's job."""
  pins_path = path(workdir, PINS_FILE)
  try:
    pins = json.loads(paths.as_path(pins_path).read_text(encoding="utf-8")) if paths.as_path(pins_path).exists() \
        else {"steps": {}}
    users = pins.setdefault("steps", {}).setdefault(str(int(step)), [])
    if by not in users:
      users.append(by)
      paths.write_atomic(pins_path, json.dumps(pins, indent=2))
  except (OSError, ValueError, AttributeError) as e:
    print(f"warning: could not pin checkpoint {step} of {workdir} in {pins_path} ({e}); keep that checkpoint, which "
          f"{by} depends on, through the base run's rotation (keep_checkpoints)", flush=True)


def lora_base_reference(base_workdir: str, step: int) -> dict[str, Any]:
  """What names a LoRA run's base model: its workdir, checkpoint step and the sha256 of its model card."""
  return {"workdir": os.path.abspath(base_workdir), "step": int(step),
          "model_sha256": paths.file_sha256(path(base_workdir, MODEL_FILE))}


def check_lora_base(saved: dict[str, Any] | None, given: dict[str, Any], where: str) -> None:
  """Refuses adapters trained on another base model than `given` (a `lora_base_reference`)."""
  if saved is not None and saved != given:
    differing = ", ".join(f"{k}: {saved.get(k)!r} vs {given.get(k)!r}" for k in sorted(set(saved) | set(given))
                          if saved.get(k) != given.get(k))
    raise errors.RunError(f"the LoRA adapters of {where} were trained on another base model than the one given "
                          f"({differing}); pass --config.init_params_from={saved.get('workdir')} (that base, at step "
                          f"{saved.get('step')}) or use a new --workdir")


def check_base_step(base_workdir: str, step: int, workdir: str) -> None:
  """Refuses, naming what is gone, LoRA adapters whose base checkpoint no longer exists."""
  ckpt = checkpoint_lib.Checkpointer(checkpoint_dir(base_workdir), async_save=False)
  try:
    steps = ckpt.steps()
  finally:
    ckpt.close()
  if step not in steps:
    raise errors.CheckpointError(
        f"checkpoint {step} of {base_workdir}, the base model the LoRA adapters of {workdir} were trained on, is gone "
        f"(it holds {steps or 'none'}); restore it there, or train the adapters again on a checkpoint it holds")


def merge_adapters(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
  """(the plain model config, its parameters) with a LoRA model's adapters folded into the weights."""
  if cfg.lora_rank <= 0:
    return cfg, params
  merged = lora.merge(params, rank=cfg.lora_rank, alpha=cfg.lora_alpha, scanned=cfg.scan_layers)
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in ModelConfig.ADAPTER_FIELDS}
  return dataclasses.replace(cfg, **defaults), merged


def checkpoint_meta(cfg: ModelConfig, tokenizer_path: str, **extra: Any) -> dict[str, Any]:
  """The metadata saved with every checkpoint: the model, the tokenizer file's hash, and `extra`."""
  return {"model": dataclasses.asdict(cfg), "tokenizer_sha256": paths.file_sha256(tokenizer_path), **extra}


def check_tokenizer(saved_meta: dict[str, Any], tokenizer_sha256: str, tokenizer_path: str,
                    step: int | None = None) -> None:
  """Refuses a tokenizer file other than the one the checkpoint was trained with (when the checkpoint says)."""
  saved_sha = saved_meta.get("tokenizer_sha256")
  if saved_sha and saved_sha != tokenizer_sha256:
    which = "checkpoint" if step is None else f"checkpoint {step}"
    raise errors.RunError(f"tokenizer {tokenizer_path} is not the one {which} was trained with (sha256 differs); "
                          "restore the workdir's original tokenizer (file and settings) or use a new --workdir")


def check_resumable(saved_meta: dict[str, Any], meta: dict[str, Any], tokenizer_path: str) -> None:
  """Refuses to resume a checkpoint with other model dimensions (ModelConfig.RUNTIME_FIELDS may change), another
  seed, another data stream or another tokenizer; `meta` is this run's `checkpoint_meta`."""
  check_model_dims(saved_meta, meta["model"])
  check_seed(saved_meta, meta.get("seed"))
  check_data_stream(saved_meta, meta.get("data_stream"))
  check_tokenizer(saved_meta, meta["tokenizer_sha256"], tokenizer_path)


def check_model_dims(saved_meta: dict[str, Any], model: dict[str, Any]) -> None:
  """Refuses model dimensions (`dataclasses.asdict` of this run's ModelConfig) other than the checkpoint's."""
  saved_model = saved_meta.get("model", {})
  default = dataclasses.asdict(ModelConfig())  # for fields added after a checkpoint was written (LoRA's)
  differing = sorted(k for k in set(saved_model) | set(model) if k not in ModelConfig.RUNTIME_FIELDS
                     and saved_model.get(k, default.get(k)) != model.get(k, default.get(k)))
  if differing:
    detail = ", ".join(f"model.{k}: checkpoint {saved_model.get(k, default.get(k))!r} vs config "
                       f"{model.get(k, default.get(k))!r}" for k in differing)
    raise errors.RunError(f"config does not match the checkpoint ({detail}); restore those values or use a new "
                          "--workdir")


def check_seed(saved_meta: dict[str, Any], seed: int | None) -> None:
  """Refuses another seed (checkpoints written before the seed was recorded carry none: accepted)."""
  saved_seed = saved_meta.get("seed")
  if saved_seed is not None and seed is not None and saved_seed != seed:
    raise errors.RunError(f"seed={seed} differs from the checkpoint's seed={saved_seed}; the data order and dropout "
                          f"would change; pass --config.seed={saved_seed} or use another --workdir")


def _stream_differences(saved: dict[str, Any], stream: dict[str, Any]) -> list[str]:
  """'key: checkpoint X vs config Y' for each setting of a `data_stream` record that differs."""
  differing = [f"{key}: checkpoint {saved.get(key)!r} vs config {stream.get(key)!r}"
               for key in ("global_batch_size", "data.seq_len") if saved.get(key) != stream.get(key)]
  saved_tok, tok = saved.get("tokenizer"), stream.get("tokenizer")
  if saved_tok and tok:
    differing += [f"tokenizer.{k}: checkpoint {saved_tok.get(k)!r} vs config {tok.get(k)!r}"
                  for k in sorted(set(saved_tok) | set(tok)) if saved_tok.get(k) != tok.get(k)]
  saved_sources, sources = saved.get("sources", []), stream.get("sources", [])
  if [s.get("name") for s in saved_sources] != [s.get("name") for s in sources]:
    return differing + [f"data sources: checkpoint {[s.get('name') or s.get('corpus') for s in saved_sources]} vs "
                        f"config {[s.get('name') or s.get('corpus') for s in sources]}"]
  for old, new in zip(saved_sources, sources):
    prefix = f"data.mixture.{new['name']}." if new.get("name") else "data."
    for key in sorted((set(old) | set(new)) - {"name"}):
      if old.get(key) == new.get(key):
        continue
      if key == "files":
        setting = f"{prefix}{'sft_files' if new.get('corpus') == 'sft' else 'text_files'}"
        differing.append(f"the files {setting} matches differ ({old[key]['count']} at the checkpoint, "
                         f"{new[key]['count']} now, or their sizes changed)" if old.get(key) and new.get(key)
                         else f"{setting}: the matched files differ")
      else:
        differing.append(f"{prefix}{key}: checkpoint {old.get(key)!r} vs config {new.get(key)!r}")
  return differing


def check_data_stream(saved_meta: dict[str, Any], stream: dict[str, Any] | None) -> None:
  """Refuses to resume when what decides the training data order or the validation set (corpus settings and files,
  split, sequence length, batch size, tokenizer settings: trainer's `data_stream` record) differs from the
  checkpoint's: validation would score documents the run trained on, or the data order would silently change.
  Checkpoints written before the record existed carry none: accepted."""
  saved = saved_meta.get("data_stream")
  if saved is None or stream is None:
    return
  differing = _stream_differences(saved, stream)
  if differing:
    raise errors.RunError(f"the training data or validation set would change on resume ({'; '.join(differing)}); "
                          "restore the checkpoint's values (and files), or use a new --workdir")


def check_optim_name(saved_meta: dict[str, Any], name: str) -> None:
  """Refuses another optimizer (its state has another layout), from the metadata alone."""
  saved_name = (saved_meta.get("optim") or {}).get("name")
  if saved_name is not None and saved_name != name:
    raise errors.RunError("the optimizer state layout differs from the checkpoint's (optim.name: checkpoint "
                          f"{saved_name!r} vs config {name!r}); {checkpoint_lib.REMEDY_LAYOUT}")


def check_optim_drift(saved_meta: dict[str, Any], optim: dict[str, Any], opt_state_tree: str) -> None:
  """Refuses to resume when changed optim settings give the optimizer state another layout, naming them.

  Settings that keep the layout (learning rate, schedule, betas) may change on resume. Checkpoints from
  before `optim` was recorded, and a differing tree with no differing setting (another optax version may
  print its states differently), are left to the checkpointer's comparison of the saved array metadata.
  """
  saved_optim, saved_tree = saved_meta.get("optim"), saved_meta.get("opt_state_tree")
  if saved_optim is None or not saved_tree or saved_tree == opt_state_tree:
    return
  differing = sorted(k for k in set(saved_optim) | set(optim) if saved_optim.get(k) != optim.get(k))
  if differing:
    detail = ", ".join(f"optim.{k}: checkpoint {saved_optim.get(k)!r} vs config {optim.get(k)!r}" for k in differing)
    raise errors.RunError(f"the optimizer state layout differs from the checkpoint's ({detail}); "
                          f"{checkpoint_lib.REMEDY_LAYOUT}")


def check_model_card(cfg: ModelConfig, saved_meta: dict[str, Any], workdir: str, step: int) -> None:
  """Refuses a model.json whose dimensions are not those checkpoint `step` was saved with."""
  saved_model, model = saved_meta.get("model", {}), dataclasses.asdict(cfg)
  differing = sorted(k for k in saved_model if k not in ModelConfig.RUNTIME_FIELDS and saved_model[k] != model.get(k))
  if differing:
    detail = ", ".join(f"{k}: {MODEL_FILE} {model.get(k)!r} vs checkpoint {saved_model[k]!r}" for k in differing)
    raise errors.RunError(f"{path(workdir, MODEL_FILE)} does not describe checkpoint {step} ({detail}); put back the "
                          "values the checkpoint was saved with")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  cfg: ModelConfig
  params: Any
  tokenizer: Tokenizer | HFTokenizer
  step: int


def load_model(workdir: str, step: int | None = None) -> LoadedModel:
  """Parameters of checkpoint `step` (default: newest), replicated on this host's devices; a LoRA run's adapters
  come merged into its base model's weights (W + A·B·alpha/r), so callers see a plain model."""
  paths.check_reachable(workdir, "--workdir")
  checkpoint_lib.check_reachable(checkpoint_dir(workdir))
  cfg, tokenizer_path = read_model_card(workdir)
  base = None
  if cfg.lora_rank > 0:
    reference = read_lora_base(workdir) or {}
    if not reference.get("workdir") or not paths.as_path(reference["workdir"]).is_dir():
      raise errors.MissingFileError(f"the base model {reference.get('workdir')!r} of LoRA workdir {workdir} (named in "
                                    f"{MODEL_FILE}) is missing; restore it there")
    check_lora_base(reference, lora_base_reference(reference["workdir"], reference["step"]), workdir)
    check_base_step(reference["workdir"], reference["step"], workdir)
    base = load_model(reference["workdir"], reference["step"])
  if not paths.as_path(tokenizer_path).exists():
    raise errors.MissingFileError(f"tokenizer {tokenizer_path} named in {MODEL_FILE} is missing")
  tokenizer = load_tokenizer(tokenizer_path)
  check_vocab_fits(cfg.vocab_size, tokenizer.vocab_size,
                   f"the model only {cfg.vocab_size}: {tokenizer_path} does not belong to this checkpoint")
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  params_abstract = nn.unbox(abstract_params(cfg))
  if base is not None:  # a LoRA checkpoint holds the adapters (and their optimizer state) only
    params_abstract = lora.split(params_abstract)[1]
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), params_abstract)
  ckpt = checkpoint_lib.Checkpointer(checkpoint_dir(workdir), async_save=False)
  try:
    steps = ckpt.steps()
    wanted = steps[-1] if step is None and steps else step
    if wanted in steps:  # an edited model.json would otherwise surface as a shape error deep inside orbax
      check_model_card(cfg, ckpt.restore_meta(wanted), workdir, wanted)
    restored_step, params = ckpt.restore_params(params_abstract, shardings, step)
    saved_meta = ckpt.restore_meta(restored_step)
  finally:
    ckpt.close()
  check_tokenizer(saved_meta, paths.file_sha256(tokenizer_path), tokenizer_path, restored_step)
  if base is not None:
    check_lora_base(saved_meta.get("lora_base"), read_lora_base(workdir), f"checkpoint {restored_step}")
    cfg, params = merge_adapters(cfg, lora.combine(base.params, params))
  return LoadedModel(cfg=cfg, params=params, tokenizer=tokenizer, step=restored_step)
