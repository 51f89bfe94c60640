"""Learning-rate schedules and the optax chain (clipping, AdamW or SGD, weight-decay mask)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

# Parameter names (the last path entry) that are never decayed: norms, biases, position tables.
NO_DECAY_SUFFIXES = ("scale", "bias", "pos_embed")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine", "rsqrt", "wsd")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The optimizer and its schedule (config.py documents each field and builds this from the experiment)."""

  name: str = "adamw"
  learning_rate: float = 3e-3
  schedule: str = "cosine"
  warmup_steps: int = 100
  decay_fraction: float = 0.2
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  momentum: float = 0.9
  nesterov: bool = False
  grad_clip_norm: float = 1.0


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
    raise ValueError(f"optim.schedule={o.schedule!r} is unknown; use constant, linear, cosine, rsqrt or wsd")
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def decay_mask(params: Any) -> Any:
  """True for the weight matrices that weight decay applies to."""

  def keep(path: tuple[Any, ...], _: Any) -> bool:
    name = str(getattr(path[-1], "key", path[-1]))
    return not name.endswith(NO_DECAY_SUFFIXES)

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(o: OptimConfig, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax chain and its schedule (returned so metrics can log the learning rate)."""
  schedule = make_schedule(o, num_steps)
  parts = [optax.clip_by_global_norm(o.grad_clip_norm)] if o.grad_clip_norm > 0 else []
  if o.name == "adamw":
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=decay_mask))
  elif o.name == "sgd":
    if o.weight_decay > 0:
      parts.append(optax.add_decayed_weights(o.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov))
  else:
    raise ValueError(f"optim.name={o.name!r} is unknown; use adamw or sgd")
  return optax.chain(*parts), schedule

