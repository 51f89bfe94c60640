"""The train state, its sharded initialisation, and the pure train and eval steps, each jitted once."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding

from llm_jax import batch as batch_lib
from llm_jax import errors
from llm_jax import lora
from llm_jax import metrics as metrics_lib
from llm_jax import optim
from llm_jax import sharding
from llm_jax import target
from llm_jax.model import Transformer
from llm_jax.model_config import ModelConfig

Batch = dict[str, jax.Array]  # the layout of llm_jax.batch

# What grad_accum_steps=0 ('auto') means per backend, from BENCHMARKS.md ("Micro-batches on CPU"): on XLA:CPU
# a per-device batch of 16,384 tokens (10m) trained 1.05x and 1.08x faster split into micro-batches of 4,096 (2,048:
# 1.04x, 8,192: 1.04x), and a 768-token batch (tiny) 0.84x as fast split in two; so on CPU the batch is split into
# the most micro-batches that keep at least this many tokens each. Other backends are unmeasured here: one batch.
AUTO_MICRO_BATCH_TOKENS = {"cpu": 4096}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # Raw key data; dropout keys are folded in from (rng, step), so resuming is exact.


@flax.struct.dataclass
class StepFns:
  """The compiled entry points and the placement they were compiled for.

  With LoRA (cfg.lora_rank > 0) the state's params are the adapters only and the frozen base weights are a separate,
  never-donated input of every step: `with_base` binds them once, so they are neither updated nor copied per step.
  """

  init: Callable[[], TrainState] = flax.struct.field(pytree_node=False)
  train_jit: Callable[..., tuple[TrainState, dict[str, jax.Array]]] = flax.struct.field(pytree_node=False)
  eval_jit: Callable[..., dict[str, jax.Array]] = flax.struct.field(pytree_node=False)
  state_shardings: Any = flax.struct.field(pytree_node=False)
  abstract_state: Any = flax.struct.field(pytree_node=False)
  batch_sharding: NamedSharding = flax.struct.field(pytree_node=False)
  abstract_base: Any = flax.struct.field(pytree_node=False, default=None)  # LoRA only, as base_shardings and base
  base_shardings: Any = flax.struct.field(pytree_node=False, default=None)
  base: Any = flax.struct.field(pytree_node=False, default=None)
  accum: int = flax.struct.field(pytree_node=False, default=1)  # micro-batches per update the train step runs

  @property
  def lora(self) -> bool:
    return self.abstract_base is not None

  def with_base(self, base: Any) -> StepFns:
    """These steps with the frozen base weights of a LoRA run bound."""
    return self.replace(base=base)

  def _base(self) -> tuple[Any, ...]:
    if not self.lora:
      return ()
    if self.base is None:
      raise ValueError("a LoRA step needs the base weights: call with_base(params) first")
    return (self.base,)

  def train(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    return self.train_jit(state, batch, *self._base())

  def eval(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
    return self.eval_jit(params, batch, *self._base())

  def full_params(self, params: Any) -> Any:
    """The whole model's parameters for the state's `params` (base and adapters together under LoRA)."""
    return lora.combine(*self._base(), params) if self.lora else params

  def lower_train(self, global_batch_size: int, seq_len: int) -> jax.stages.Lowered:
    """The train step lowered for abstract inputs of this placement (compile it to see memory and FLOPs)."""
    state = sharding.with_shardings(self.abstract_state, self.state_shardings)
    base = (sharding.with_shardings(self.abstract_base, self.base_shardings),) if self.lora else ()
    return self.train_jit.lower(state, batch_lib.abstract(global_batch_size, seq_len, self.batch_sharding), *base)


def _forward_loss(params: Any, model: Transformer, batch: Batch, dropout_key: jax.Array | None, base: Any = None,
                  z_loss: float = 0.0):
  """(summed objective, (weight sum, correct, summed weighted NLL, summed log(Z)²)): the objective adds
  z_loss·log(Z)²; the mean loss is NLL / weight sum. `base`: LoRA's frozen weights."""
  if base is not None:
    params = lora.combine(base, params)
  deterministic = dropout_key is None
  rngs = None if deterministic else {"dropout": dropout_key}
  logits_BxLxV, _ = model.apply({"params": params}, batch["inputs"], batch["positions"],
                                batch["segment_ids"], deterministic=deterministic, rngs=rngs)
  nll_sum, count, correct = metrics_lib.cross_entropy(logits_BxLxV, batch["targets"], batch["loss_mask"])
  if not z_loss:
    return nll_sum, (count, correct, nll_sum, jnp.float32(0))
  z_sum = metrics_lib.z_loss_sum(logits_BxLxV, batch["loss_mask"])
  return nll_sum + z_loss * z_sum, (count, correct, nll_sum, z_sum)


def resolve_grad_accum_steps(accum: int, global_batch_size: int, seq_len: int, data_parallel: int,
                             backend: str) -> int:
  """The micro-batches per update that run: `accum` as given, or for 0 ('auto') the most that split each
  data-parallel device's rows evenly into micro-batches of at least AUTO_MICRO_BATCH_TOKENS[backend] tokens (1 on
  backends it does not name, or when no split keeps that many)."""
  target = AUTO_MICRO_BATCH_TOKENS.get(backend)
  if accum or target is None or global_batch_size % data_parallel:
    return accum or 1
  rows = global_batch_size // data_parallel
  return max(k for k in range(1, rows + 1) if rows % k == 0 and (k == 1 or rows // k * seq_len >= target))


def _micro_batches(batch: Batch, accum: int) -> Batch:
  """(B, ...) → (A, B/A, ...) taking every A-th row, so each device keeps its own rows."""

  def split(x):
    x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, sharding.batch_spec(leading=1))

  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: Batch, base: Any = None, *, model: Transformer,
               tx: optax.GradientTransformation, schedule: optax.Schedule, accum: int,
               z_loss: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on the mean next-token loss of the global batch (summed over micro-batches), plus
  z_loss times the mean log(Z)² when z_loss > 0 (the `loss` metric stays the plain NLL; `z_loss` is logged). With
  LoRA `state.params` are the adapters, the only leaves differentiated and updated, and `base` the frozen rest.

  A non-finite loss or gradient norm leaves parameters and optimizer state untouched and sets the
  `nonfinite` metric; the trainer then stops or carries on according to `on_nonfinite`.
  """
  with nn.logical_axis_rules(sharding.LOGICAL_RULES):
    base_key = jax.random.wrap_key_data(state.rng)
    grad_fn = jax.value_and_grad(_forward_loss, has_aux=True)
    dropout = model.cfg.dropout_rate > 0

    def micro_step(carry, xs):
      grads_acc, sums = carry
      micro, index = xs
      key = jax.random.fold_in(jax.random.fold_in(base_key, state.step), index) if dropout else None
      (_, aux), grads = grad_fn(state.params, model, micro, key, base, z_loss)
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      return (grads_acc, tuple(s + a for s, a in zip(sums, aux))), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, (jnp.float32(0),) * 4)
    if accum == 1:
      carry, _ = micro_step(init, (batch, 0))
    else:
      carry, _ = jax.lax.scan(micro_step, init, (_micro_batches(batch, accum), jnp.arange(accum)))
    grads_sum, (count, correct, nll_sum, z_sum) = carry
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads_sum)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(nll_sum) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  step_metrics = {
      "loss": nll_sum / denom,
      "accuracy": correct / denom,
      "grad_norm": grad_norm,
      "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
      "tokens": count,
      "nonfinite": 1.0 - finite.astype(jnp.float32),
  }
  if z_loss:
    step_metrics["z_loss"] = z_sum / denom
  return new_state, step_metrics


def eval_step(params: Any, batch: Batch, base: Any = None, *, model: Transformer) -> dict[str, jax.Array]:
  """Summed NLL, token count and correct guesses of one batch (reduce over batches on the host)."""
  with nn.logical_axis_rules(sharding.LOGICAL_RULES):
    nll_sum, (count, correct, _, _) = _forward_loss(params, model, batch, None, base)
  return {"nll_sum": nll_sum, "tokens": count, "correct": correct}


def _init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, seq_len: int):
  model = Transformer(cfg)
  init_key, state_key = jax.random.split(jax.random.key(seed))
  boxed = model.init(init_key, jnp.zeros((1, seq_len), jnp.int32))["params"]
  # LoRA trains the adapters alone: the state holds them, and the base (boxed[0]) arrives from elsewhere.
  boxed = lora.split(boxed) if cfg.lora_rank > 0 else (None, boxed)
  params = nn.unbox(boxed[1])
  return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(state_key)), boxed


def _shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int,
               seq_len: int) -> tuple[Any, Any, Any, Any]:
  """(abstract state, its shardings, parameter shardings, (abstract base, base shardings) or None under LoRA):
  optimizer moments sharded like params."""
  abstract_state, (abstract_base, abstract_boxed) = jax.eval_shape(
      functools.partial(_init_state, cfg, tx, seed, seq_len))
  params_sh = sharding.param_shardings(abstract_boxed, mesh)
  base = None if abstract_base is None else (nn.unbox(abstract_base), sharding.param_shardings(abstract_base, mesh))
  replicated = sharding.replicated(mesh)
  opt_sh = sharding.opt_state_shardings(abstract_state.opt_state, abstract_state.params, params_sh)
  shardings = TrainState(step=replicated, params=params_sh, opt_state=opt_sh, rng=replicated)
  return abstract_state, shardings, params_sh, base


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int,
                    seq_len: int) -> tuple[Any, Any, Any]:
  """(abstract state, its shardings, parameter shardings): optimizer moments sharded like params."""
  return _shardings(cfg, tx, mesh, seed, seq_len)[:3]


def build_steps(cfg: ModelConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                mesh: Mesh, *, seed: int, seq_len: int, accum: int, z_loss: float = 0.0) -> StepFns:
  """Jits init, train and eval once, with explicit in/out shardings and the state donated."""
  model = Transformer(cfg)
  abstract_state, state_sh, params_sh, base = _shardings(cfg, tx, mesh, seed, seq_len)
  sharding.check_divisible(abstract_state.params, params_sh, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  batch_shardings = {k: batch_sh for k in batch_lib.KEYS}
  replicated = sharding.replicated(mesh)
  base_in = () if base is None else (base[1],)  # the frozen base: an input, never donated
  init = jax.jit(lambda: _init_state(cfg, tx, seed, seq_len)[0], out_shardings=state_sh)
  train = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule, accum=accum, z_loss=z_loss),
                  in_shardings=(state_sh, batch_shardings, *base_in), out_shardings=(state_sh, replicated),
                  donate_argnums=(0,))
  evaluate = jax.jit(functools.partial(eval_step, model=model),
                     in_shardings=(params_sh, batch_shardings, *base_in), out_shardings=replicated)
  abstract_base, base_sh = base or (None, None)
  return StepFns(init=init, train_jit=train, eval_jit=evaluate, state_shardings=state_sh,
                 abstract_state=abstract_state, batch_sharding=batch_sh, abstract_base=abstract_base,
                 base_shardings=base_sh, accum=accum)


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the steps need beyond the model and the optimizer, and the one table of these top-level config keys'
  defaults; seq_len (data.seq_len) and num_train_steps (the loop's) are copied in by config.resolve."""

  seq_len: int
  num_train_steps: int
  seed: int = 0  # Seeds parameters, dropout and data order.
  global_batch_size: int = 32  # Sequences per update, summed over all devices and micro-batches.
  # Micro-batches per update (each global_batch_size / grad_accum_steps); 0: per backend (AUTO_MICRO_BATCH_TOKENS).
  grad_accum_steps: int = 0
  z_loss: float = 0.0  # Adds z_loss·log(Z)² per token to the training loss (logged as z_loss); 0 disables.
  max_replicated_share: float = 0.05  # Refuse fsdp/tensor meshes replicating more parameter bytes than this.

  def check(self) -> None:
    """Refuses (ConfigError, one line naming the key and the fix) what cannot work."""
    errors.require(self.global_batch_size > 0, f"global_batch_size={self.global_batch_size} must be positive "
                   "(sequences per optimizer step, over all devices and micro-batches)")
    errors.require(self.grad_accum_steps >= 0, f"grad_accum_steps={self.grad_accum_steps} must be positive (or 0: "
                   "chosen per backend)")
    errors.require(self.global_batch_size % max(self.grad_accum_steps, 1) == 0, f"global_batch_size="
                   f"{self.global_batch_size} does not divide into grad_accum_steps={self.grad_accum_steps} "
                   "micro-batches; make it a multiple")
    errors.require(0.0 <= self.max_replicated_share <= 1.0, f"max_replicated_share={self.max_replicated_share} must "
                   "be in [0, 1]")
    errors.require(math.isfinite(self.z_loss) and self.z_loss >= 0, f"z_loss={self.z_loss} must be >= 0 and finite "
                   "(0 disables; e.g. 1e-4)")


def build(cfg: ModelConfig, optim_cfg: optim.OptimConfig, step_cfg: StepConfig, mesh: Mesh) -> StepFns:
  """The jitted steps of a resolved model, optimizer and step config on `mesh`; call under `jax.set_mesh(mesh)`.

  The one builder: the trainer, the dry run and planner, the benchmark, the tools and the tests call it. Micro-batches
  'auto' (grad_accum_steps=0) resolve for the platform being compiled for (`target.platform()`), and a step that
  would replicate more than max_replicated_share of the parameters is refused.
  """
  tx, schedule = optim.make_optimizer(optim_cfg, step_cfg.num_train_steps)
  accum = resolve_grad_accum_steps(step_cfg.grad_accum_steps, step_cfg.global_batch_size, step_cfg.seq_len,
                                   sharding.data_parallel_size(mesh.shape), target.platform())
  fns = build_steps(cfg, tx, schedule, mesh, seed=step_cfg.seed, seq_len=step_cfg.seq_len, accum=accum,
                    z_loss=step_cfg.z_loss)
  sharding.check_replication(fns.abstract_state.params, fns.state_shardings.params, mesh,
                             step_cfg.max_replicated_share)
  return fns
