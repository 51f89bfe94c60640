"""Learning-rate schedules and the optax chain: clipping, the optimizer (AdamW, SGD, Muon, Lion, Adafactor or
schedule-free AdamW), the weight-decay mask and per-group learning-rate multipliers."""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import ClassVar

import jax
import optax
from optax import contrib

from llm_jax import errors

# Parameter names (the last path entry) that are never decayed: norms, biases, position tables.
NO_DECAY_SUFFIXES = ("scale", "bias", "pos_embed")
OPTIMIZERS = ("adamw", "sgd", "muon", "lion", "adafactor", "schedule_free_adamw")
SCHEDULES = ("constant", "linear", "cosine", "rsqrt", "wsd")
# Parameter groups, for learning-rate multipliers and for what Muon orthogonalises ('matrix' only).
PARAM_GROUPS = ("embed", "head", "norm", "bias", "matrix")
# Which optimizers read which optimizer-specific keys (OptimConfig.check refuses the others).
READS = {"b1": ("adamw", "muon", "lion", "schedule_free_adamw"), "b2": ("adamw", "muon", "lion", "schedule_free_adamw"),
         "eps": ("adamw", "muon", "schedule_free_adamw"), "momentum": ("sgd",), "nesterov": ("sgd",),
         "adam_learning_rate": ("muon",)}
# Peak learning rates that optim.learning_rate=0 stands for: the optima of sotu_small's grid
# (experiments/ablation_optimizer.py). The other optimizers have no measured rate, so they need one set.
DEFAULT_LEARNING_RATES = {"muon": 0.02, "adamw": 3e-3}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The optimizer and its schedule, and the one table of their defaults (the experiment config's optim section is
  built from it, with learning_rate 0: the chosen optimizer's measured best, resolved by `derive`)."""

  DERIVED_FIELDS: ClassVar[tuple[str, ...]] = ("learning_rate",)

  # 'muon' (the default: 0.29 nats below AdamW at sotu_small, experiments/ablation_knobs.py), 'adamw', 'sgd'
  # (momentum), 'lion', 'adafactor' or 'schedule_free_adamw'.
  name: str = "muon"
  # Peak learning rate; Muon's for the weight matrices. Derived (0): the measured best of the chosen optimizer,
  # DEFAULT_LEARNING_RATES (Muon 0.02, AdamW 3e-3); sgd, lion, adafactor and schedule_free_adamw need one.
  learning_rate: float = 0.02
  schedule: str = "cosine"  # 'constant', 'linear', 'cosine', 'rsqrt', 'wsd'.
  warmup_steps: int = 100  # Linear warm-up from 0 to the peak.
  decay_fraction: float = 0.2  # 'wsd': share of the run spent in the final linear decay.
  min_lr_ratio: float = 0.1  # Final learning rate as a share of the peak (cosine, linear, wsd).
  b1: float = 0.9  # First-moment decay: AdamW, Muon's AdamW group, Lion; schedule-free's interpolation (y) weight.
  b2: float = 0.95  # Second-moment decay (AdamW, Muon's AdamW group, schedule-free AdamW); Lion's momentum decay.
  eps: float = 1e-8  # Denominator epsilon (AdamW, Muon, schedule-free AdamW).
  weight_decay: float = 0.1  # Decoupled; never applied to norms, biases or position embeddings.
  momentum: float = 0.9  # 'sgd' only.
  nesterov: bool = False  # 'sgd' only.
  grad_clip_norm: float = 1.0  # Global-norm clipping; 0 disables.
  # 'muon' only: peak learning rate of the AdamW group (embeddings, norms, biases, output head); learning_rate
  # is then Muon's, for the weight matrices. Same schedule shape.
  adam_learning_rate: float = 3e-3
  # Per-group learning-rate multipliers, 'group=factor,...' over embed (token and position tables), head
  # (untied output head), norm, bias, matrix (every other weight); unnamed groups keep 1. '' disables.
  lr_multipliers: str = ""

  @classmethod
  def derive(cls, settings: dict[str, Any]) -> OptimConfig:
    """The optimizer an experiment config's optim section describes, learning_rate 0 resolved to the chosen
    optimizer's DEFAULT_LEARNING_RATES entry."""
    o = cls(**settings)
    errors.require_choice("optim.name", o.name, OPTIMIZERS)
    errors.require(math.isfinite(o.learning_rate) and o.learning_rate >= 0, f"optim.learning_rate={o.learning_rate} "
                   "must be positive and finite (or 0: the optimizer's default)")
    if o.learning_rate:
      return o
    if o.name not in DEFAULT_LEARNING_RATES:
      measured = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LEARNING_RATES.items())
      raise errors.ConfigError(f"optim.learning_rate is unset and optim.name={o.name!r} has no measured default rate; "
                               f"pass --config.optim.learning_rate=<peak rate> (the measured ones: {measured})")
    return dataclasses.replace(o, learning_rate=DEFAULT_LEARNING_RATES[o.name])

  def check(self) -> None:
    """Refuses (ConfigError, one line naming the optim.<key> and the fix) what cannot work or would be ignored."""
    errors.require_choice("optim.name", self.name, OPTIMIZERS)
    errors.require_choice("optim.schedule", self.schedule, SCHEDULES)
    errors.require(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
    errors.require(0.0 < self.decay_fraction <= 1.0, f"optim.decay_fraction={self.decay_fraction} must be in (0, 1]")
    errors.require(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
    for key in ("weight_decay", "grad_clip_norm"):
      errors.require(getattr(self, key) >= 0, f"optim.{key}={getattr(self, key)} must be >= 0 (0 disables)")
    errors.require(0 < self.adam_learning_rate < float("inf"), f"optim.adam_learning_rate={self.adam_learning_rate} "
                   "must be positive and finite")
    errors.require(self.name != "schedule_free_adamw" or self.schedule == "constant", "optim.name="
                   "'schedule_free_adamw' replaces the learning-rate decay, but optim.schedule="
                   f"{self.schedule!r}; pass --config.optim.schedule=constant (warm-up still applies)")
    errors.require(self.name != "schedule_free_adamw" or 0.0 < self.b1 < 1.0, f"optim.b1={self.b1} must be in (0, 1) "
                   "for schedule_free_adamw (its eval params divide by b1)")
    parse_lr_multipliers(self.lr_multipliers)
    for key, readers in READS.items():
      if self.name not in readers:
        errors.refuse_ignored(f"optim.{key}", getattr(self, key), getattr(OptimConfig, key),
                              f"optim.name={self.name!r}", f"optim.name={readers[0]}")
    if self.schedule != "wsd":
      errors.refuse_ignored("optim.decay_fraction", self.decay_fraction, OptimConfig.decay_fraction,
                            f"optim.schedule={self.schedule!r}", "optim.schedule=wsd")


def make_schedule(o: OptimConfig, num_steps: int) -> optax.Schedule:
  """Learning rate as a function of the step: warm-up, then the named shape."""
  peak, warmup = o.learning_rate, o.warmup_steps
  floor = peak * o.min_lr_ratio
  after = max(num_steps - warmup, 1)
  if o.schedule == "constant":
    main = optax.constant_schedule(peak)
  elif o.schedule == "linear":
    main = optax.linear_schedule(peak, floor, after)
  elif o.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, after, alpha=o.min_lr_ratio)
  elif o.schedule == "rsqrt":
    # Continuous with the warm-up: peak at the end of warm-up, then peak·sqrt(warmup / step).
    offset = max(warmup, 1)
    main = lambda count: peak * jax.lax.rsqrt((count + offset) / offset)
  elif o.schedule == "wsd":
    decay = max(int(round(num_steps * o.decay_fraction)), 1)
    stable = max(after - decay, 0)
    main = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [stable])
  else:
    raise errors.ConfigError(f"optim.schedule={o.schedule!r} is unknown; use constant, linear, cosine, rsqrt or wsd")
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def _names(path: tuple[Any, ...]) -> list[str]:
  return [str(getattr(p, "key", p)) for p in path]


def decay_mask(params: Any) -> Any:
  """True for the weight matrices that weight decay applies to."""
  return jax.tree_util.tree_map_with_path(lambda path, _: not _names(path)[-1].endswith(NO_DECAY_SUFFIXES), params)


def param_group(path: tuple[Any, ...]) -> str:
  """The group (one of PARAM_GROUPS) of the parameter at `path` in the model's tree."""
  names = _names(path)
  if names[-1] in ("embed", "pos_embed"):
    return "embed"
  if names[-1] == "lm_head":
    return "head"
  if names[-1] == "scale" or any(n.endswith("_norm") for n in names):
    return "norm"
  if names[-1].endswith("bias"):
    return "bias"
  return "matrix"


def param_groups(params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(lambda path, _: param_group(path), params)


def muon_dimension_numbers(params: Any) -> Any:
  """How Muon sees each weight matrix as (inputs, outputs); None for the rest (embeddings, head, norms, biases,
  anything under two dimensions), which AdamW updates.

  A scanned stack's layer axis is a batch axis (each layer orthogonalised alone). The attention output
  (H, K, D) reduces over heads and head dim; every other matrix reduces over its first axis: (D, H, K)
  projections and (D, F), (F, D) MLP matrices.
  """
  def dims(path: tuple[Any, ...], x: Any) -> contrib.MuonDimensionNumbers | None:
    names, n = _names(path), x.ndim
    lead = 1 if "layers" in names else 0
    if param_group(path) != "matrix" or n - lead < 2:
      return None
    if names[-1] == "out":
      return contrib.MuonDimensionNumbers(reduction_axis=tuple(range(lead, n - 1)), output_axis=n - 1)
    return contrib.MuonDimensionNumbers(reduction_axis=lead, output_axis=tuple(range(lead + 1, n)))

  return jax.tree_util.tree_map_with_path(dims, params)


def parse_lr_multipliers(spec: str) -> dict[str, float]:
  """'group=factor,...' (groups from PARAM_GROUPS) as a dict; a one-line ValueError names a bad entry."""
  out: dict[str, float] = {}
  for entry in filter(None, (e.strip() for e in spec.split(","))):
    group, sep, value = entry.partition("=")
    try:
      factor = float(value)
    except ValueError:
      factor = -1.0
    if not sep or group.strip() not in PARAM_GROUPS or not factor >= 0 or group.strip() in out:
      raise errors.ConfigError(f"optim.lr_multipliers entry {entry!r} is not group=factor with a factor >= 0 and a "
                               f"group named once from {', '.join(PARAM_GROUPS)}; e.g. "
                               "--config.optim.lr_multipliers='embed=0.5,head=2'")
    out[group.strip()] = factor
  return out


def _group_scaling(spec: str) -> optax.GradientTransformation | None:
  """Scales each group's update (a per-group learning rate); None when no multiplier is set."""
  factors = parse_lr_multipliers(spec)
  if not factors:
    return None
  transforms = {g: optax.scale(factors.get(g, 1.0)) for g in PARAM_GROUPS}
  return optax.partition(transforms, param_groups)


def _muon(o: OptimConfig, schedule: optax.Schedule, num_steps: int) -> optax.GradientTransformation:
  """Muon on the 'matrix' group; AdamW (decay mask, its own learning rate) on embeddings, norms, biases, head."""
  adam_schedule = make_schedule(dataclasses.replace(o, learning_rate=o.adam_learning_rate), num_steps)
  label = lambda params: jax.tree.map(lambda d: "adamw" if d is None else "muon", muon_dimension_numbers(params),
                                     is_leaf=lambda d: d is None or isinstance(d, contrib.MuonDimensionNumbers))
  matrices = contrib.muon(schedule, weight_decay=o.weight_decay, muon_weight_dimension_numbers=muon_dimension_numbers)
  rest = optax.adamw(adam_schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
  return optax.partition({"muon": matrices, "adamw": rest}, label)


def _schedule_free_adamw(o: OptimConfig, schedule: optax.Schedule,
                         scaling: optax.GradientTransformation | None) -> optax.GradientTransformation:
  """optax's schedule_free_adamw built from its parts, so it takes the decay mask and group multipliers."""
  base = [optax.scale_by_rms(decay=o.b2, eps=o.eps, eps_in_sqrt=False, bias_correction=True),
          optax.add_decayed_weights(o.weight_decay, mask=decay_mask)]
  base += [scaling] if scaling is not None else []
  base.append(optax.scale_by_learning_rate(schedule))
  return contrib.schedule_free(optax.chain(*base), learning_rate=schedule, b1=o.b1)


def _core(o: OptimConfig, schedule: optax.Schedule, num_steps: int) -> list[optax.GradientTransformation]:
  """The optimizer's transforms (a list, so the chain and its state tree stay flat as before)."""
  if o.name == "adamw":
    return [optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)]
  if o.name == "sgd":
    parts = [optax.add_decayed_weights(o.weight_decay, mask=decay_mask)] if o.weight_decay > 0 else []
    return parts + [optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov)]
  if o.name == "muon":
    return [_muon(o, schedule, num_steps)]
  if o.name == "lion":
    return [optax.lion(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)]
  if o.name == "adafactor":
    # Absolute steps like AdamW's (no parameter-scale factor); decay lr·wd·p, as the other optimizers.
    return [optax.adafactor(schedule, multiply_by_parameter_scale=False,
                            weight_decay_rate=lambda count: o.weight_decay * schedule(count),
                            weight_decay_mask=decay_mask)]
  raise errors.ConfigError(f"optim.name={o.name!r} is unknown; use one of {', '.join(OPTIMIZERS)}")


def make_optimizer(o: OptimConfig, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax chain and its schedule (returned so metrics can log the learning rate)."""
  schedule = make_schedule(o, num_steps)
  parts = [optax.clip_by_global_norm(o.grad_clip_norm)] if o.grad_clip_norm > 0 else []
  scaling = _group_scaling(o.lr_multipliers)
  if o.name == "schedule_free_adamw":
    parts.append(_schedule_free_adamw(o, schedule, scaling))
  else:
    parts += _core(o, schedule, num_steps) + ([scaling] if scaling is not None else [])
  return optax.chain(*parts), schedule


def eval_params(opt_state: Any, params: Any) -> Any:
  """The parameters to evaluate, sample and export: schedule-free's averaged x, otherwise `params` themselves."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, contrib.ScheduleFreeState))
           if isinstance(s, contrib.ScheduleFreeState)]
  return contrib.schedule_free_eval_params(found[0], params) if found else params
