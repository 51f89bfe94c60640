"""What keeps a run safe: the workdir lock, preemption on SIGTERM and non-finite detection."""

from __future__ import annotations

import fcntl
import os
import signal
from typing import Any

import jax
from jax.experimental import multihost_utils


class RunError(RuntimeError):
  """A run that must stop; the message says why and what to do."""


class WorkdirLock:
  """An exclusive flock on the lock file `path` in a workdir (`workdir.lock_path`); the OS releases it when the
  process dies, even by SIGKILL."""

  def __init__(self, path: str):
    self.path = path
    self._fd: int | None = None

  def acquire(self) -> None:
    if jax.process_index() != 0:
      return  # one lock per run: process 0 holds it for all
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise RunError(f"workdir {os.path.dirname(self.path)} is in use by a running job (pid {holder}); "
                     "wait for it to finish or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


class Preemption:
  """Turns SIGTERM (how a Cloud TPU VM announces preemption) into a stop after the current step.

  With several processes JAX's own preemption notifier catches the signal and
  `reached_preemption_sync_point` makes every process agree on the same step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self) -> None:
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def first_nonfinite_step(steps: list[int], flags: list[float]) -> int | None:
  for step, flag in zip(steps, flags):
    if flag:
      return step
  return None
