"""The typed run record: `RunConfig`, the frozen sections a run reads (model, optim, data, tokenizer, mesh, sample,
step, loop, evals), the checks that span sections, and the platform choices ('auto' attention and remat,
micro-batches, causal query blocks) resolved for the devices a run compiles for.

`llm_jax.config` builds a RunConfig from an experiment's ConfigDict (`config.resolve`); nothing below it sees one.
Each section checks itself (`ModelConfig.check`, `DataConfig.check`, ...); `RunConfig.check` runs them and the checks
between sections, and `RunConfig.on_devices` those that need the mesh.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from typing import Any

import jax

from llm_jax import attention_kernels
from llm_jax import errors
from llm_jax import sampling
from llm_jax import sharding
from llm_jax import steps as steps_lib
from llm_jax import tokenizer as tokenizer_lib
from llm_jax import tpu
from llm_jax.attention import query_blocks
from llm_jax.data import corpus
from llm_jax.loop import LoopPlan
from llm_jax.model import resolve_remat_policy
from llm_jax.model_config import ModelConfig
from llm_jax.optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Validation batches and the extra eval sets run during training: the one table of these top-level config keys'
  defaults."""

  eval_batches: int = 8  # Validation batches per pass.
  eval_batch_size: int = 32  # Sequences per validation batch.
  eval_text_files: str = ""  # Extra eval sets: comma-separated globs, one document per file (loss, bits/byte).
  eval_zero_shot_files: str = ""  # Zero-shot JSONL files scored at every evaluation (accuracy).
  eval_harness_tasks: str = ""  # lm-eval task names (comma-separated) run like eval_zero_shot_files; the eval extra.
  eval_harness_include_path: str = ""  # Folder of lm-eval YAML tasks for eval_harness_tasks (experiments/data/...).
  eval_harness_limit: int = 0  # Items per harness task at each evaluation; 0: all of them.

  @property
  def text_files(self) -> str:
    return self.eval_text_files.strip()

  @property
  def zero_shot_files(self) -> list[str]:
    return [p.strip() for p in self.eval_zero_shot_files.split(",") if p.strip()]

  @property
  def harness_tasks(self) -> list[str]:
    return [t.strip() for t in self.eval_harness_tasks.split(",") if t.strip()]

  @property
  def any_extra(self) -> bool:
    """Whether any extra eval set (text files, zero-shot files, harness tasks) is configured."""
    return bool(self.text_files or self.zero_shot_files or self.harness_tasks)

  def check(self) -> None:
    for key in ("eval_batches", "eval_batch_size"):
      errors.require(getattr(self, key) > 0, f"{key}={getattr(self, key)} must be positive")
    for pattern in filter(None, (p.strip() for p in self.eval_text_files.split(","))):
      errors.require(bool(glob.glob(pattern)), f"eval_text_files={pattern!r} matches no files; pass existing globs")
    for path in self.zero_shot_files:
      errors.require(os.path.exists(path), f"eval_zero_shot_files names {path!r}, which does not exist; pass JSONL "
                     "files such as experiments/data/zero_shot_example.jsonl")
    tasks = self.harness_tasks
    for key in ("eval_harness_include_path", "eval_harness_limit"):
      errors.require(bool(tasks) or not getattr(self, key), f"{key} is set but no eval_harness_tasks are; name the "
                     f"tasks or clear {key}")
    errors.require(self.eval_harness_limit >= 0, f"eval_harness_limit={self.eval_harness_limit} must be >= 0 (0: all)")
    path = self.eval_harness_include_path
    errors.require(not path or os.path.isdir(path), f"eval_harness_include_path={path!r} is not a folder; pass the "
                   "folder of the tasks' YAML files")
    errors.require(not tasks or importlib.util.find_spec("lm_eval") is not None, "eval_harness_tasks needs lm_eval, "
                   "which is not installed; pip install -e .[eval] (lm-eval==0.4.13)")


@dataclasses.dataclass(frozen=True)
class PlatformChoices:
  """What the settings chosen per backend run as on the platform a run compiles for: written into config.json under
  'resolved' and printed on the start-up line."""

  backend: str
  attention_impl: str
  causal_query_blocks: int  # 0: a fused kernel (no blocks of ours)
  remat_policy: str
  grad_accum_steps: int


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything one run reads, resolved from an experiment config (`llm_jax.config.resolve`) and checked.

  `model` has its derived dimensions filled in except a vocab_size of 0, which is the tokenizer's (`with_vocab`);
  with init_params_from it is the base model's dimensions with this run's runtime and adapter fields. `platform` is
  None until `on_devices` resolves it for a mesh.
  """

  model: ModelConfig
  optim: OptimConfig
  data: corpus.DataConfig
  tokenizer: tokenizer_lib.TokenizerConfig
  mesh: sharding.MeshConfig
  sample: sampling.SampleConfig
  step: steps_lib.StepConfig
  loop: LoopPlan
  evals: EvalConfig
  # The top-level config keys that are this record's own (the rest belong to step, loop and evals), with their defaults:
  init_params_from: str = ""  # A workdir (trained or converted) whose weights, dimensions and tokenizer to start from.
  # Start over in a workdir that holds an earlier run (run.json, metrics) but no usable checkpoint; without it such a
  # start is refused. Refused beside checkpoints, which a run always resumes.
  restart: bool = False
  dry_run: bool = False  # Compile the step for this shape, print memory, FLOPs and shardings, then exit.
  plan: bool = False  # With topology: rank micro-batch x remat x mesh candidates for the slice (llm_jax.plan).
  # dry_run/plan: compile for this Cloud TPU slice, by its gcloud name (v5e-8, v5litepod-16, v5p-128, v6e-8, v4-8),
  # on any machine, through libtpu (pip install -e .[tpu]); '' compiles for the devices present.
  topology: str = ""
  # Slices joined by the data-center network: the data axis spans them (a hybrid ICI/DCN mesh; mesh.data counts all
  # slices). Training on real multi-slice hardware and the topology dry run both read it.
  num_slices: int = 1
  keep_checkpoints: int = 3  # Newest checkpoints kept on disk.
  peak_flops_per_device: float = 0.0  # For MFU; 0: datasheet value by device kind, measured on CPU.
  platform: PlatformChoices | None = None  # Not a config key: resolved by `on_devices`.

  @property
  def seed(self) -> int:
    return self.step.seed

  def with_vocab(self, vocab_size: int) -> RunConfig:
    """This run with the tokenizer's `vocab_size` where model.vocab_size is 0 (derived)."""
    return dataclasses.replace(self, model=self.model.with_vocab(vocab_size))

  def check(self) -> None:
    """Every check that needs no device and no data: each section's own, then those between sections; each failure is
    one ConfigError naming the key and the fix, and a setting the chosen mode would ignore is one too."""
    for section in (self.model, self.optim, self.data, self.loop, self.step, self.evals):
      section.check()
    if not self.init_params_from:  # a base model brings its tokenizer, which config.resolve puts in its place
      self.tokenizer.check()
    m, t, seq_len = self.model, self.tokenizer, self.data.seq_len
    errors.require(self.keep_checkpoints > 0, f"keep_checkpoints={self.keep_checkpoints} must be positive")
    errors.require(m.max_len >= seq_len, f"model.max_len={m.max_len} is shorter than data.seq_len={seq_len}; raise "
                   "model.max_len")
    warmup, steps = self.optim.warmup_steps, self.loop.num_train_steps
    errors.require(warmup <= steps, f"optim.warmup_steps={warmup} is longer than the run (num_train_steps={steps}); "
                   "the peak learning rate would never be reached: lower optim.warmup_steps")
    if not (self.init_params_from or t.path or t.model_type == "char"):
      errors.require(not m.vocab_size or m.vocab_size >= t.vocab_size, f"model.vocab_size={m.vocab_size} is smaller "
                     f"than tokenizer.vocab_size={t.vocab_size}: ids past it would have no embedding row; raise "
                     "model.vocab_size (or 0: the tokenizer's)")
    errors.require(not m.lora_rank or bool(self.init_params_from), f"model.lora_rank={m.lora_rank} must be 0 (off) or "
                   "positive with --config.init_params_from=WORKDIR (the base model the adapters train on)")
    errors.require(self.data.corpus != "sft" or bool(self.init_params_from or t.path), "data.corpus='sft' fine-tunes a "
                   "model and keeps its tokenizer: pass --config.init_params_from=WORKDIR (or --config.tokenizer.path)")
    errors.require(not self.loop.extra_eval_every or self.evals.any_extra, "extra_eval_every is set but there are no "
                   "eval_text_files, eval_zero_shot_files or eval_harness_tasks to run; set one or clear "
                   "extra_eval_every")
    self._check_topology()
    self.sample.check(self.sample.given())
    if not self.init_params_from:  # a base model's dimensions: config.resolve checks the fit once it has them
      self.check_sample_fits()

  def check_sample_fits(self) -> None:
    """The end-of-run samples fit the model's positions and the KV-cache bound (the prompt's length in tokens is
    checked once the tokenizer is known)."""
    sampling.check_fits(self.model.with_vocab(1), self.sample.max_length, self.sample.num_return_sequences,
                        "--config.sample.")

  def _check_topology(self) -> None:
    """A named TPU slice is compiled for by the dry run and the planner only, and needs libtpu to be installed."""
    errors.require(self.num_slices >= 1, f"num_slices={self.num_slices} must be at least 1")
    errors.require(not self.plan or bool(self.topology), "plan=True searches meshes and batches for a TPU slice: pass "
                   "--config.topology=<slice>, e.g. v5e-8")
    if not self.topology:
      return
    errors.require(self.dry_run or self.plan, f"topology={self.topology!r} is read by the dry run and the planner "
                   "only; pass --config.dry_run=True or --config.plan=True (or clear topology)")
    tpu.parse_slice(self.topology, self.num_slices)
    tpu.check_libtpu(f"topology={self.topology!r}")

  def on_devices(self, mesh_shape: dict[str, int], platform: str) -> RunConfig:
    """This run with its platform choices resolved for a mesh of `mesh_shape` on `platform` ('cpu', 'gpu', 'tpu'),
    after the checks that need them: the attention kernel must run there with these shapes, and the batches must
    split evenly over the data-parallel devices."""
    m, seq_len = self.model, self.data.seq_len
    capability = getattr(jax.devices()[0], "compute_capability", "9.0") if platform == "gpu" else "9.0"
    attention_kernels.check_attention_impl(m.attention_impl, platform, compute_dtype=m.compute_dtype,
                                           head_dim=m.head_dim, seq_len=seq_len, gpu_capability=str(capability))
    data_parallel = sharding.data_parallel_size(mesh_shape)
    accum, batch = max(self.step.grad_accum_steps, 1), self.step.global_batch_size  # 'auto' (0) splits evenly
    errors.require(batch // accum % data_parallel == 0, f"micro-batch of {batch // accum} sequences (global_batch_size"
                   f"={batch} / grad_accum_steps={accum}) does not divide over data x fsdp = {data_parallel} devices; "
                   f"make global_batch_size a multiple of {data_parallel * accum}")
    errors.require(self.evals.eval_batch_size % data_parallel == 0, f"eval_batch_size={self.evals.eval_batch_size} "
                   f"does not divide over data x fsdp = {data_parallel} devices; make it a multiple of {data_parallel}")
    impl = attention_kernels.resolve_attention_impl(m.attention_impl, platform)
    choices = PlatformChoices(
        backend=platform, attention_impl=impl, causal_query_blocks=query_blocks(impl, platform, seq_len),
        remat_policy=resolve_remat_policy(m.remat_policy, platform),
        grad_accum_steps=steps_lib.resolve_grad_accum_steps(self.step.grad_accum_steps, batch, seq_len, data_parallel,
                                                            platform))
    return dataclasses.replace(self, platform=choices)

  def step_records(self) -> tuple[ModelConfig, OptimConfig, steps_lib.StepConfig]:
    """What `steps.build` takes: with the platform choices in place of 'auto' once `on_devices` resolved them, else
    as given (the step then resolves 'auto' for the platform it compiles for)."""
    if self.platform is None:
      return self.model, self.optim, self.step
    return self.step_model(), self.optim, self.step_config()

  def step_model(self) -> ModelConfig:
    """The model the step compiles: this run's, with the platform's attention and remat in place of 'auto'."""
    if self.platform is None:
      raise ValueError("step_model needs the platform choices: call on_devices first")
    return dataclasses.replace(self.model, attention_impl=self.platform.attention_impl,
                               remat_policy=self.platform.remat_policy)

  def step_config(self) -> steps_lib.StepConfig:
    """The step settings with the platform's micro-batch count in place of 0 ('auto')."""
    if self.platform is None:
      raise ValueError("step_config needs the platform choices: call on_devices first")
    return dataclasses.replace(self.step, grad_accum_steps=self.platform.grad_accum_steps)

  def record(self) -> dict[str, Any]:
    """The run as config.json keeps it: the experiment config's keys with derived values resolved, and the platform
    choices under 'resolved'."""
    data = dataclasses.asdict(self.data)
    data["mixture"] = {part.name: {"weight": part.weight, **{key: getattr(part.data, key)
                                                            for key in corpus.COMPONENT_FIELDS}}
                       for part in self.data.mixture}
    step = {k: v for k, v in dataclasses.asdict(self.step).items() if k != "seq_len"}
    record = {**step, **dataclasses.asdict(self.loop), **dataclasses.asdict(self.evals),
              **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.default is not dataclasses.MISSING and f.name != "platform"},
              "model": dataclasses.asdict(self.model), "optim": dataclasses.asdict(self.optim), "data": data,
              "tokenizer": dataclasses.asdict(self.tokenizer), "mesh": dataclasses.asdict(self.mesh),
              "sample": dataclasses.asdict(self.sample)}
    if self.platform is not None:
      record["resolved"] = dataclasses.asdict(self.platform)
    return record
