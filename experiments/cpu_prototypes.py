"""CPU levers tried as prototypes: patches of the model's projections that `cpu_levers.py --prototype` applies
while it traces side B only, so each measurement stays reproducible without living in `llm_jax`.

- `dense_vjp`: every activation × weight einsum of the model whose weight dimensions are (inputs..., outputs...)
  gets a custom VJP that flattens both sides to matrices and writes the two gradients as plain 2-D dots,
  dx = dy · Wᵀ and dW = xᵀ · dy, instead of the einsum transposes autodiff derives.

Batched-dot attention started here too (commit a38f7fd) and is now `llm_jax.attention`'s own layout.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any
from typing import Iterator

import jax
import jax.numpy as jnp

from llm_jax import model as model_lib

PROTOTYPES = ("dense_vjp",)


def _weight_split(spec: str) -> int | None:
  """How many leading dimensions of x are batch dimensions, for an `x, w -> y` einsum whose weight is
  (contracted..., output...) and whose x ends with the contracted dimensions; None for any other einsum."""
  inputs, _, out = spec.replace(" ", "").partition("->")
  parts = inputs.split(",")
  if len(parts) != 2:
    return None
  xs, ws = parts
  contracted = "".join(c for c in xs if c in ws and c not in out)
  keep = xs[:len(xs) - len(contracted)]
  if not contracted or not xs.endswith(contracted) or not ws.startswith(contracted):
    return None
  return len(keep) if out == keep + ws[len(contracted):] else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense(lead: int, x: jax.Array, w: jax.Array) -> jax.Array:
  n_in = x.ndim - lead
  y2 = x.reshape(math.prod(x.shape[:lead]), -1) @ w.reshape(math.prod(w.shape[:n_in]), -1)
  return y2.reshape(x.shape[:lead] + w.shape[n_in:])


def _dense_fwd(lead: int, x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return _dense(lead, x, w), (x, w)


def _dense_bwd(lead: int, res: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
  x, w = res
  n_in = x.ndim - lead
  x2 = x.reshape(math.prod(x.shape[:lead]), -1)
  w2 = w.reshape(math.prod(w.shape[:n_in]), -1)
  dy2 = dy.reshape(x2.shape[0], -1)
  return (dy2 @ w2.T).reshape(x.shape).astype(x.dtype), (x2.T @ dy2).reshape(w.shape).astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


class _JnpWithDenseVjp:
  """`jax.numpy` as the model sees it, except that projection einsums go through `_dense`."""

  def __getattr__(self, name: str) -> Any:
    return getattr(jnp, name)

  @staticmethod
  def einsum(spec: str, *operands: jax.Array, **kwargs: Any) -> jax.Array:
    lead = _weight_split(spec) if len(operands) == 2 and not kwargs else None
    if lead is None:
      return jnp.einsum(spec, *operands, **kwargs)
    return _dense(lead, *operands)


@contextlib.contextmanager
def patched(name: str) -> Iterator[None]:
  """Applies prototype `name` ('' for none) to `llm_jax.model` for the duration of the block (a trace)."""
  if name and name not in PROTOTYPES:
    raise ValueError(f"--prototype={name!r} is unknown; choose from {', '.join(PROTOTYPES)} (or '' for none)")
  if not name:
    yield
    return
  attr, value = {"dense_vjp": ("jnp", _JnpWithDenseVjp())}[name]
  saved = getattr(model_lib, attr)
  setattr(model_lib, attr, value)
  # JAX caches the traces of scan and remat bodies by function, which a patched global does not change: without
  # clearing them the patched model would reuse the unpatched trace (and the next trace the patched one).
  jax.clear_caches()
  try:
    yield
  finally:
    setattr(model_lib, attr, saved)
    jax.clear_caches()
