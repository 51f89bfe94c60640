"""The platform a step is traced for: the default backend, or the TPU a step is compiled for from another machine.

Per-backend choices made at trace time (remat 'auto', causal attention blocks, micro-batches 'auto') read
`platform()`, so a step compiled for a TPU topology on a CPU machine (`llm_jax.dryrun`) is the step that TPU trains.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("llm_jax_target_platform", default=None)


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform being compiled for. In order: the one `compiling_for` names, the devices of
  the mesh being traced under ('tpu' for a mesh over a TPU topology's devices, on any host), the default backend."""
  if _OVERRIDE.get():
    return _OVERRIDE.get()
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


@contextlib.contextmanager
def compiling_for(name: str) -> Iterator[None]:
  """Traces inside the block as for platform `name` (e.g. 'tpu' while compiling for a topology on a CPU)."""
  token = _OVERRIDE.set(name)
  try:
    yield
  finally:
    _OVERRIDE.reset(token)
