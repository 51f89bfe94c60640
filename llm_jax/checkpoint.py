"""Orbax checkpoints of the train state, the data-iterator state and run metadata, with safe restore."""

from __future__ import annotations

import os
from typing import Any
from typing import Callable

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llm_jax import sharding


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was required."""


def unusable_dir(directory: str) -> str:
  """Where checkpoints of `directory` that fail to load are moved: beside it, as unusable_<its name>."""
  return os.path.join(os.path.dirname(directory), "unusable_" + os.path.basename(directory))


class Checkpointer:
  """Saves checkpoints into `directory` when told to (asynchronously by default), keeps the newest `keep`
  (None: all), and restores them."""

  def __init__(self, directory: str, *, keep: int | None = None, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any], meta: dict[str, Any]) -> bool:
    """Starts saving step `step` (asynchronously unless `async_save=False`); returns whether it started."""
    return self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)))

  def save_params(self, step: int, params: Any, meta: dict[str, Any]) -> None:
    """A parameters-only checkpoint (converted or exported weights); `restore_params` reads it."""
    self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params}), data=ocp.args.JsonSave({}),
        meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def restore_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract_state: Any, shardings: Any, step: int | None = None,
              check_meta: Callable[[dict[str, Any]], None] | None = None
              ) -> tuple[int, Any, dict[str, Any], dict[str, Any]] | None:
    """(step, state, data_state, meta) of the newest restorable checkpoint (or `step`), or None.

    `check_meta` sees a checkpoint's metadata before its arrays are read (config drift is refused
    there, with a message, rather than as a shape error). A checkpoint that fails to load (truncated
    or missing files from a killed writer) is reported and moved aside for the next older one;
    nothing is deleted.
    """
    candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
    if step is not None and step not in self.steps():
      raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; available: "
                            f"{self.steps() or 'none'}")
    target = sharding.with_shardings(abstract_state, shardings)
    for candidate in candidates:
      try:
        meta = self.restore_meta(candidate)
      except Exception:  # pylint: disable=broad-except  # unreadable metadata: handled as unusable below
        meta = None
      if meta is not None and check_meta is not None:
        check_meta(meta)
      try:
        restored = self.manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  # any unreadable file means unusable
        if step is not None:
          raise CheckpointError(f"checkpoint at step {step} in {self.directory} is unusable: "
                                f"{type(e).__name__}") from e
        moved = self._quarantine(candidate)
        print(f"checkpoint at step {candidate} is unusable ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:160] if str(e) else ''}); moved it to {moved} and trying an older one",
              flush=True)
        continue
      return candidate, restored["state"], restored["data"], restored["meta"]
    return None

  def restore_params(self, abstract_params: Any, shardings: Any, step: int | None = None) -> tuple[int, Any]:
    """Only the parameters (no optimizer state) of checkpoint `step` or the newest one."""
    steps = self.steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}; train first with python -m "
                            "llm_jax.train --workdir=... or convert weights with python -m llm_jax.convert")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; available: {steps}")
    target = {"params": sharding.with_shardings(abstract_params, shardings)}
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
    return step, restored["state"]["params"]

  def _quarantine(self, step: int) -> str:
    """Moves an unusable checkpoint out of the manager's sight (never deletes it), so the step can be redone."""
    source = os.path.join(self.directory, str(step))
    target = os.path.join(unusable_dir(self.directory), f"{step}")
    if jax.process_index() == 0 and os.path.exists(source):
      os.makedirs(os.path.dirname(target), exist_ok=True)
      suffix = 0
      while os.path.exists(target if not suffix else f"{target}.{suffix}"):
        suffix += 1
      target = target if not suffix else f"{target}.{suffix}"
      os.rename(source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"llm_jax:quarantine:{step}")
    self.manager.reload()
    return target

  def wait_until_saved(self) -> None:
    """Blocks until every started save has committed (is a complete checkpoint on storage)."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
