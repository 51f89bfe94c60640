"""What keeps a run safe: the workdir lock, preemption on SIGTERM, non-finite detection and config drift."""

from __future__ import annotations

import fcntl
import os
import signal
from typing import Any

import jax
from jax.experimental import multihost_utils

from llm_jax import checkpoint as checkpoint_lib

LOCK_FILE = ".lock"

# Model fields that may change between a checkpoint and the run resuming it: they alter how the
# same parameters are computed with, not what the parameters are.
RESUMABLE_MODEL_FIELDS = ("dropout_rate", "compute_dtype", "scan_layers", "remat_policy", "attention_impl")


class RunError(RuntimeError):
  """A run that must stop; the message says why and what to do."""


class WorkdirLock:
  """An exclusive flock on `workdir/.lock`; the OS releases it when the process dies, even by SIGKILL."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
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


def check_drift(saved_meta: dict[str, Any], model: dict[str, Any], tokenizer_sha256: str) -> None:
  """Refuses to resume a checkpoint with other model dimensions or another tokenizer."""
  saved_model = saved_meta.get("model", {})
  differing = sorted(k for k in set(saved_model) | set(model)
                     if k not in RESUMABLE_MODEL_FIELDS and saved_model.get(k) != model.get(k))
  if differing:
    detail = ", ".join(f"model.{k}: checkpoint {saved_model.get(k)!r} vs config {model.get(k)!r}"
                       for k in differing)
    raise RunError(f"config does not match the checkpoint ({detail}); restore those values or use a new "
                   "--workdir")
  saved_sha = saved_meta.get("tokenizer_sha256")
  if saved_sha and saved_sha != tokenizer_sha256:
    raise RunError("the tokenizer does not match the one the checkpoint was trained with (sha256 differs); "
                   "restore the workdir's tokenizer settings or use a new --workdir")



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
    raise RunError(f"the optimizer state layout differs from the checkpoint's ({detail}); "
                   f"{checkpoint_lib.REMEDY_LAYOUT}")
