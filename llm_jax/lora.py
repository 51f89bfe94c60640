"""LoRA: low-rank adapters on chosen projections (their parameters, the adapter/base split of a parameter tree, and
merging them into the base weights).

A projection y = x·W of a target gains y += (x·A)·B · alpha/r, with A (inputs x r) drawn at init and B (r x outputs)
zero, so an untrained adapter leaves the model exactly as it was. Adapter leaves are named `<weight>_lora_a` and
`<weight>_lora_b` beside the weight they adapt; `merge` folds them in as W + A·B·alpha/r.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax import errors

# Target names in model.lora_targets → the weights they adapt (GPT-2 and Llama names).
TARGETS = {"q": ("query",), "k": ("key",), "v": ("value",), "o": ("out",), "mlp_in": ("fc", "gate", "up"),
           "mlp_out": ("proj", "down")}
SUFFIXES = ("_lora_a", "_lora_b")


def parse_targets(targets: str) -> tuple[str, ...]:
  """The weight names `targets` (comma-separated TARGETS keys) adapt; ValueError on a name that matches none."""
  names = [t.strip() for t in targets.split(",") if t.strip()]
  unknown = [t for t in names if t not in TARGETS]
  if unknown or not names:
    raise errors.ConfigError(f"model.lora_targets={targets!r}: {', '.join(unknown) or 'nothing'} matches no "
                             f"projection; use comma-separated names from {', '.join(TARGETS)}")
  repeated = sorted({t for t in names if names.count(t) > 1})
  if repeated:  # one adapter per weight: a repeat is a typo, not a second adapter
    raise errors.ConfigError(f"model.lora_targets={targets!r} names {', '.join(repeated)} more than once; name each "
                             "projection once")
  return tuple(w for t in names for w in TARGETS[t])


def delta(module: nn.Module, name: str, x: jax.Array, dims: tuple[str, str], shapes: tuple[tuple[int, ...], ...],
          axes: tuple[tuple[str | None, ...], ...], rank: int, alpha: float) -> jax.Array:
  """(x·A)·B·alpha/r for weight `name` of `module`; `dims` are the einsum letters of its input and output axes,
  `shapes` and `axes` their sizes and logical names (x is B x L x inputs)."""
  (in_dims, out_dims), (in_shape, out_shape), (in_axes, out_axes) = dims, shapes, axes
  fan_in = 1
  for size in in_shape:
    fan_in *= size
  a = module.param(f"{name}_lora_a", nn.with_logical_partitioning(nn.initializers.normal(fan_in ** -0.5),
                                                                  (*in_axes, None)), (*in_shape, rank), jnp.float32)
  b = module.param(f"{name}_lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None, *out_axes)),
                   (rank, *out_shape), jnp.float32)
  h_BxLxR = jnp.einsum(f"BL{in_dims},{in_dims}R->BLR", x, a.astype(x.dtype))
  return jnp.einsum(f"BLR,R{out_dims}->BL{out_dims}", h_BxLxR, b.astype(x.dtype)) * (alpha / rank)


def adapt(cfg: Any, module: nn.Module, name: str, y: jax.Array, x: jax.Array, *spec: Any) -> jax.Array:
  """Projection `name`'s output y = x·W, plus its adapter's when `cfg` (a ModelConfig) puts one there; `spec` is
  `dims, shapes, axes` of `delta`."""
  if cfg.lora_rank <= 0 or name not in parse_targets(cfg.lora_targets):
    return y
  return y + delta(module, name, x, *spec, rank=cfg.lora_rank, alpha=cfg.lora_alpha)


def is_adapter(path: tuple[Any, ...]) -> bool:
  return str(getattr(path[-1], "key", path[-1])).endswith(SUFFIXES)


def _select(params: Any, adapters: bool) -> dict[str, Any]:
  """The nested-dict subtree of adapter (or of base) leaves."""
  out: dict[str, Any] = {}
  for key, value in params.items():
    if isinstance(value, dict):
      sub = _select(value, adapters)
      if sub:
        out[key] = sub
    elif is_adapter((key,)) == adapters:
      out[key] = value
  return out


def split(params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """(base, adapters): the parameter tree cut into the frozen weights and the trained adapter leaves."""
  return _select(params, False), _select(params, True)


def combine(base: Any, adapters: Any) -> dict[str, Any]:
  """The inverse of `split`: one tree holding both."""
  out = dict(base)
  for key, value in adapters.items():
    out[key] = combine(out.get(key, {}), value) if isinstance(value, dict) else value
  return out


def merge(params: Any, *, rank: int, alpha: float, scanned: bool) -> dict[str, Any]:
  """The base tree with every adapter folded in (W + A·B·alpha/r); `scanned`: leaves carry a leading layer axis."""
  fold = lambda w, a, b: w + (jnp.tensordot(a, b, axes=1) * (alpha / rank)).astype(w.dtype)

  def walk(tree: dict[str, Any], layered: bool) -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        out[key] = walk(value, layered or (scanned and key == "layers"))
      elif not is_adapter((key,)):
        a, b = tree.get(f"{key}_lora_a"), tree.get(f"{key}_lora_b")
        out[key] = value if a is None else (jax.vmap(fold) if layered else fold)(value, a, b)
    return out

  return walk(dict(params), False)
