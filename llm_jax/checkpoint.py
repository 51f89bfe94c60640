"""Orbax checkpoints of the train state, the data-iterator state and run metadata, with safe restore.

A gs:// directory goes to orbax as it is (orbax writes it through tensorstore, and needs google-cloud-storage on
the machine); only a local one is made absolute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
import json
import os
import shutil
import time
from typing import Any
from typing import Callable
from typing import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from llm_jax import errors
from llm_jax import optim
from llm_jax import paths
from llm_jax import sharding

# A storage hiccup (network filesystem, bucket) is retried this many times, `RESTORE_BACKOFF_S` doubling,
# before the run refuses to go on; it never counts as damage, so it never moves a checkpoint aside.
RESTORE_ATTEMPTS = 4
RESTORE_BACKOFF_S = 2.0
# FileNotFoundError and friends mean a file is missing (a killed writer): damage, not a hiccup.
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
_TRANSIENT_ERRNOS = {errno.EIO, errno.ETIMEDOUT, errno.EAGAIN, errno.EBUSY, errno.ESTALE, errno.ECONNRESET,
                     errno.ECONNREFUSED, errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EINTR}
# Room left beyond a checkpoint's array bytes (its metadata, JSON items, file system blocks).
_SPACE_MARGIN = 16 << 20
REMEDY_LAYOUT = ("keep the old optim settings, or start a new --workdir from these weights with "
                 "--config.init_params_from=<workdir>")


def check_reachable(directory: str) -> None:
  """Refuses a gs:// checkpoint directory when orbax could not write it (it needs google-cloud-storage there), or
  when its name holds glob characters: orbax lists its files by globbing below the directory, and on an object
  store that glob would read them as a pattern (`paths` makes local paths literal)."""
  if not paths.is_local(directory) and any(c in directory for c in "[*?"):
    raise errors.ConfigError(f"checkpoint directory {directory} holds a glob character ([, * or ?), which orbax's "
                             "listing on an object store would read as a pattern; pick a --workdir without them")
  if not directory.startswith("gs://"):
    return
  try:
    found = importlib.util.find_spec("google.cloud.storage") is not None
  except ModuleNotFoundError:
    found = False
  if not found:
    raise errors.ConfigError(f"checkpoints in {directory} need the google-cloud-storage package (orbax reaches gs:// "
                             "through it); pip install google-cloud-storage on every host")


def _schedule_free_tx(meta: dict[str, Any]) -> Any:
  """The optimizer a schedule-free checkpoint was trained with (from its recorded optim settings), else None."""
  saved = meta.get("optim") or {}
  if saved.get("name") != "schedule_free_adamw":
    return None
  fields = {f.name for f in dataclasses.fields(optim.OptimConfig)}
  return optim.make_optimizer(optim.OptimConfig(**{k: v for k, v in saved.items() if k in fields}), 1)[0]


def unusable_dir(directory: str) -> str:
  """Where checkpoints of `directory` that fail to load are moved: beside it, as unusable_<its name>."""
  return os.path.join(os.path.dirname(directory), "unusable_" + os.path.basename(directory))
class LayoutMismatch(errors.CheckpointError):
  """The saved train state is intact but has another tree structure, shapes or dtypes than the run's."""


def is_transient(error: BaseException) -> bool:
  """A storage error that may go away on retry (EIO, timeouts, dropped connections), as opposed to damage."""
  if isinstance(error, (ConnectionError, TimeoutError)):
    return True
  return isinstance(error, OSError) and not isinstance(error, _MISSING) and (
      error.errno in _TRANSIENT_ERRNOS or error.errno is None)


def _path_str(path: tuple[Any, ...]) -> str:
  """'opt_state/1/0/mu/embed': the same for a live state (attributes, namedtuples) and orbax's saved dicts."""
  def one(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  return "/".join(one(e) for e in path)


def _layout(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  return {_path_str(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if leaf is not None}


def _summary(names: list[str], limit: int = 4) -> str:
  shown = ", ".join(names[:limit])
  return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown or "none"


def layout_difference(saved: Any, target: Any) -> str | None:
  """What differs between a saved state's array metadata and an abstract target (None: the same layout)."""
  a, b = _layout(saved), _layout(target)
  if a == b:
    return None
  only_saved, only_target = sorted(set(a) - set(b)), sorted(set(b) - set(a))
  changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
  differing = only_saved + only_target + changed
  part = ("the optimizer state layout" if all(k.startswith("opt_state") for k in differing)
          else "the train state layout")
  details = []
  if only_saved or only_target:
    details.append(f"checkpoint has keys {_summary(only_saved)} vs config {_summary(only_target)}")
  if changed:
    details.append("; ".join(f"{k}: checkpoint {a[k][0]} {a[k][1]} vs config {b[k][0]} {b[k][1]}"
                             for k in changed[:3]) + (f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""))
  return f"{part} differs: {'; '.join(details)}"


def read_pins(path: str) -> set[int] | None:
  """The steps pinned in the JSON file `path` ({"steps": {"30": [who needs it, ...]}}); None when it is unreadable
  (then every checkpoint is kept: deleting one another run needs cannot be undone)."""
  if not paths.as_path(path).exists():
    return set()
  try:
    return {int(step) for step in json.loads(paths.as_path(path).read_text(encoding="utf-8"))["steps"]}
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return None


class _PinnedSteps:
  """An orbax preservation policy keeping the steps pinned in a file (`read_pins`), read at every rotation, so a pin
  added by another run while this one trains holds."""

  def __init__(self, path: str):
    self.path = path

  def should_preserve(self, checkpoints: Any, *, context: Any) -> list[bool]:  # pylint: disable=unused-argument
    pinned = read_pins(self.path)
    return [pinned is None or c.step in pinned for c in checkpoints]


class Checkpointer:
  """Saves checkpoints into `directory` when told to (asynchronously by default), keeps the newest `keep`
  (None: all) and any step pinned in the file `pins` (checkpoints other runs depend on), and restores them."""

  def __init__(self, directory: str, *, keep: int | None = None, async_save: bool = True, pins: str = ""):
    self.directory = paths.absolute(directory)
    rotation = {"max_to_keep": keep} if keep is None or not pins else {
        "preservation_policy": ocp.checkpoint_managers.AnyPreservationPolicy(
            [ocp.checkpoint_managers.LatestN(keep), _PinnedSteps(pins)])}
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, create=True, **rotation)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any], meta: dict[str, Any]) -> bool:
    """Starts saving step `step` (asynchronously unless `async_save=False`); returns whether it started. Refused
    at once, in one line, when the disk cannot hold it (`_check_space`) or an earlier save failed on storage."""
    self._check_space(step, state)
    with self._storage_errors():
      return self.manager.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(meta)))

  def _check_space(self, step: int, state: Any) -> None:
    """Refuses a save that the local disk has no room for (the arrays' bytes), before orbax's writer threads fail
    one by one with tracebacks and the run trains on until the next save."""
    if not paths.is_local(self.directory) or not os.path.isdir(self.directory):
      return
    need = sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(state)) + _SPACE_MARGIN
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise errors.CheckpointError(f"no room for checkpoint {step} in {self.directory}: {free / 1e6:,.0f} MB free, it "
                                   f"needs about {need / 1e6:,.0f} MB; free space, then rerun the same command (it "
                                   f"resumes from checkpoint {self.latest()})")

  @contextlib.contextmanager
  def _storage_errors(self) -> Iterator[None]:
    """Turns a full disk met while writing (errno ENOSPC/EDQUOT, or tensorstore's RESOURCE_EXHAUSTED) into one line."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  # re-raised unless it is a full disk
      text = " ".join(str(e).split())
      if not (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) and not any(
          sign in text for sign in ("RESOURCE_EXHAUSTED", "No space left", "Disk quota exceeded")):
        raise
      raise errors.CheckpointError(f"the disk holding {self.directory} is full: writing a checkpoint failed "
                                   f"({text[:160]}); free space, then rerun the same command (it resumes "
                                   "from the newest complete checkpoint)") from None

  def check_for_errors(self) -> None:
    """Raises now what a finished background save failed with (a full disk in one line), rather than at the next
    save."""
    with self._storage_errors():
      self.manager.check_for_errors()

  def save_params(self, step: int, params: Any, meta: dict[str, Any]) -> None:
    """A parameters-only checkpoint (converted or exported weights); `restore_params` reads it."""
    self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params}), data=ocp.args.JsonSave({}),
        meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def restore_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def read_meta(self, step: int) -> dict[str, Any]:
    """`restore_meta`, retried through storage hiccups like a restore (then refused with errors.CheckpointError); damage
    raises as it is."""
    return self._retrying(step, lambda: self.restore_meta(step))

  def restore(self, abstract_state: Any, shardings: Any, step: int | None = None,
              check_meta: Callable[[dict[str, Any]], None] | None = None
              ) -> tuple[int, Any, dict[str, Any], dict[str, Any]] | None:
    """(step, state, data_state, meta) of the newest restorable checkpoint (or `step`); None when there is none.

    Three kinds of failure, told apart before anything is moved:
    - another layout (`check_meta` refusing config drift, or the saved tree structure, shapes or dtypes
      differing from `abstract_state`): the checkpoint is fine, the run is not; refused with `errors.CheckpointError`
      (or `check_meta`'s own error), nothing moved. Checked on metadata only, before any array is read.
    - a storage error (EIO, timeouts): retried with backoff, then refused; nothing moved.
    - damage (truncated, undecodable or missing files from a killed writer): the checkpoint is reported and
      moved to `unusable_checkpoints/` (never deleted) and the next older one is tried. When every one is
      damaged this raises rather than returning None, so a run never silently starts over on a workdir
      that had checkpoints.
    """
    available = self.steps()
    if step is not None and step not in available:
      raise errors.CheckpointError(f"no checkpoint at step {step} in {self.directory}; available: "
                                   f"{available or 'none'}")
    candidates = [step] if step is not None else sorted(available, reverse=True)
    target = sharding.with_shardings(abstract_state, shardings)
    failures = []
    for candidate in candidates:
      try:
        meta = self._retrying(candidate, lambda c=candidate: self.restore_meta(c))
      except errors.CheckpointError:
        raise
      except Exception:  # pylint: disable=broad-except  # unreadable metadata: damage, handled below
        meta = None
      if meta is not None and check_meta is not None:
        check_meta(meta)
      try:
        saved = self._retrying(candidate, lambda c=candidate: self._saved_state_metadata(c))
        difference = layout_difference(saved, abstract_state)
        if difference:
          raise LayoutMismatch(f"checkpoint at step {candidate} in {self.directory} does not fit this run: "
                               f"{difference}; {REMEDY_LAYOUT}")
        restored = self._retrying(candidate, lambda c=candidate: self.manager.restore(c, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())))
      except errors.CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # anything else unreadable is damage
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if step is not None:
          raise errors.CheckpointError(f"checkpoint at step {step} in {self.directory} is unusable ({reason})") from e
        moved = self._quarantine(candidate)
        failures.append(candidate)
        print(f"checkpoint at step {candidate} is unusable ({reason}); moved it to {moved}"
              f"{' and trying an older one' if candidate != candidates[-1] else ''}", flush=True)
        continue
      return candidate, restored["state"], restored["data"], restored["meta"]
    if failures:
      raise errors.CheckpointError(f"no checkpoint in {self.directory} could be restored (tried steps {failures}, all "
                                   f"damaged); moved them to {self.unusable_directory}; nothing was overwritten: "
                                   "restore one from a backup, or start over with a new --workdir")
    return None

  @property
  def unusable_directory(self) -> str:
    return unusable_dir(self.directory)

  def quarantined(self) -> list[str]:
    """Names of the checkpoints earlier runs moved aside as unusable."""
    path = self.unusable_directory
    return sorted(p.name for p in paths.as_path(path).iterdir()) if paths.as_path(path).is_dir() else []

  def _saved_state_metadata(self, step: int) -> Any:
    """The saved 'state' item's tree of array metadata (shapes, dtypes), read without reading any array."""
    handler = ocp.StandardCheckpointHandler()
    try:
      metadata = handler.metadata(epath.Path(self.directory) / str(step) / "state")
    finally:
      handler.close()
    return getattr(metadata, "tree", metadata)

  def _retrying(self, step: int, read: Callable[[], Any]) -> Any:
    """`read()`, retried with doubling backoff while it fails with a transient storage error."""
    delay = RESTORE_BACKOFF_S
    for attempt in range(1, RESTORE_ATTEMPTS + 1):
      try:
        return read()
      except Exception as e:  # pylint: disable=broad-except  # re-raised unless transient
        if not is_transient(e):
          raise
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if attempt == RESTORE_ATTEMPTS:
          raise errors.CheckpointError(f"storage error reading the checkpoint at step {step} in "
                                       f"{self.directory} ({reason}), {RESTORE_ATTEMPTS} attempts; it was left "
                                       "in place: check the filesystem and run again") from e
        print(f"storage error reading the checkpoint at step {step} ({reason}); retrying in {delay:g} s",
              flush=True)
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")

  def restore_params(self, abstract_params: Any, shardings: Any, step: int | None = None) -> tuple[int, Any]:
    """The parameters to evaluate or start from, of checkpoint `step` or the newest one: the saved parameters,
    or for a schedule-free run the averaged ones (`optim.eval_params`), read with the optimizer state."""
    steps = self.steps()
    if not steps:
      raise errors.CheckpointError(f"no checkpoint in {self.directory}; train first with python -m llm_jax.train "
                                   "--workdir=... or convert weights with python -m llm_jax.convert")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise errors.CheckpointError(f"no checkpoint at step {step} in {self.directory}; available: {steps}")
    target = {"params": sharding.with_shardings(abstract_params, shardings)}
    tx = _schedule_free_tx(self.restore_meta(step))
    if tx is not None:  # its params are the gradient point y; evaluation wants x, computed from y and z
      abstract_opt = jax.eval_shape(tx.init, abstract_params)
      target["opt_state"] = sharding.with_shardings(
          abstract_opt, sharding.opt_state_shardings(abstract_opt, abstract_params, shardings))
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))["state"]
    if tx is not None:
      return step, optim.eval_params(restored["opt_state"], restored["params"])
    return step, restored["params"]

  def _quarantine(self, step: int) -> str:
    """Moves an unusable checkpoint out of the manager's sight (never deletes it), so the step can be redone."""
    source = os.path.join(self.directory, str(step))
    target = os.path.join(unusable_dir(self.directory), f"{step}")
    if jax.process_index() == 0 and paths.as_path(source).exists():
      paths.makedirs(os.path.dirname(target))
      suffix = 0
      while paths.as_path(target if not suffix else f"{target}.{suffix}").exists():
        suffix += 1
      target = target if not suffix else f"{target}.{suffix}"
      paths.as_path(source).rename(target)  # on an object store: a copy of every object, then a delete
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"llm_jax:quarantine:{step}")
    self.manager.reload()
    return target

  def wait_until_saved(self) -> None:
    """Blocks until every started save has committed (is a complete checkpoint on storage)."""
    with self._storage_errors():
      self.manager.wait_until_finished()

  def close(self) -> None:
    with self._storage_errors():
      try:
        self.manager.wait_until_finished()
      finally:
        self.manager.close()
