"""Where metrics go: `metrics.jsonl`, TensorBoard event files and the console (process 0 only).

Both files may live on an object store (gs://), where a file cannot be appended to: there each write replaces
the whole object (metrics.jsonl, and the event file, which is written locally and uploaded at every flush), so
a killed run leaves the last whole version. A write then uploads the whole file: a few hundred bytes per logged
step so far (about 3 MB after 10,000 log lines).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any
from typing import Mapping

import jax

from llm_jax import paths
from llm_jax import workdir as workdir_lib


def _read_lines(path: str) -> list[tuple[str, dict[str, Any] | None]]:
  """(raw line, record or None when it does not parse) for each non-blank line of a metrics file.

  A last line without its newline that does not parse is what a kill mid-write leaves: dropped silently
  (the resumed run writes that step again). Any other bad line is kept as None with one warning naming
  the file and line, so one damaged line never makes a run unresumable or a sweep report fail.
  """
  with paths.as_path(path).open("rb") as f:
    lines = io.TextIOWrapper(f, encoding="utf-8", errors="replace").readlines()
  parsed = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    except ValueError as e:
      if number == len(lines) and not line.endswith("\n"):
        continue
      print(f"warning: {path} line {number} is not a metrics record ({str(e)[:80]}); skipping it", file=sys.stderr,
            flush=True)
      parsed.append((line, None))
      continue
    parsed.append((line, record))
  return parsed


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All readable records of a run's metrics.jsonl (empty when there is none); bad lines are skipped."""
  path = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
  if not paths.as_path(path).exists():
    return []
  return [record for _, record in _read_lines(path) if record is not None]


def _tensorboardx() -> tuple[Any, Any, Any]:
  """tensorboardX's EventsWriter, event proto module and scalar summary, imported without torch.

  The package's __init__ imports its SummaryWriter, which imports torch when it is installed, only to accept
  torch tensors: 1.5 s of every run's start-up on a machine with torch, for a writer we do not use. Where torch
  is not loaded yet, it is hidden for the duration of the import (tensorboardX then takes numpy arrays only).
  """
  hide = "torch" not in sys.modules and "tensorboardX" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
  try:
    from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=import-outside-toplevel
    from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
    from tensorboardX.summary import scalar  # pylint: disable=import-outside-toplevel
  finally:
    if hide:
      del sys.modules["torch"]
  return EventsWriter, event_pb2, scalar


class _EventFile:
  """A TensorBoard event file written synchronously, so `flush` means on disk.

  tensorboardX's SummaryWriter hands events to a thread through a queue and its flush() does not drain
  that queue: every SIGKILLed run lost what was queued (usually everything, as it writes every 120 s).
  For a `logdir` on an object store the file is written in a local temporary folder and uploaded whole, through
  epath, at every flush (tensorboardX's own gs:// writer would need google-cloud-storage and bypass epath).
  """

  def __init__(self, logdir: str, purge_step: int | None):
    EventsWriter, event_pb2, scalar = _tensorboardx()  # pylint: disable=invalid-name
    self._event_pb2, self._scalar = event_pb2, scalar
    self._local_dir = None if paths.is_local(logdir) else tempfile.mkdtemp(prefix="llm_jax_events_")
    paths.makedirs(self._local_dir or logdir)
    # The nanosecond suffix keeps two writers started in the same second apart, and in start order:
    # TensorBoard reads a run's files sorted by name, and purging depends on that order.
    self._writer = EventsWriter(os.path.join(self._local_dir or logdir, "events"), f".{time.time_ns()}")
    # pylint: disable-next=protected-access  # the name EventsWriter chose, to upload under the same one
    self._upload_to = os.path.join(logdir, os.path.basename(self._writer._file_name)) if self._local_dir else None
    if purge_step:
      # What SummaryWriter(purge_step=...) writes: TensorBoard hides older events at steps >= purge_step.
      self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=event_pb2.SessionLog(
          status=event_pb2.SessionLog.START)))

  def add_scalar(self, name: str, value: float, step: int) -> None:
    self._writer.write_event(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                                   summary=self._scalar(name, value)))

  def flush(self) -> None:
    self._writer.flush()
    if self._upload_to:
      # pylint: disable-next=protected-access
      with open(self._writer._file_name, "rb") as f:
        paths.write_atomic(self._upload_to, f.read())

  def close(self) -> None:
    self.flush()
    self._writer.close()
    if self._local_dir:
      shutil.rmtree(self._local_dir, ignore_errors=True)


class MetricWriter:
  """Appends one JSON object per step; on resume drops records past the resumed step first."""

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
    self._tb = None
    self._text: str | None = None  # the whole file, kept only for an object store (no appends there)
    if not self.enabled:
      return
    kept = self._truncate_after(resume_step)
    # Earlier invocations' event files cannot be trusted: one killed before a flush leaves an empty file,
    # and one killed after the checkpoint we resume from holds steps that are about to be redone. So on
    # resume the new event file gets the whole history again from metrics.jsonl (the record of truth),
    # and purge_step at its first step makes TensorBoard hide every older event from that step on: the
    # newest file alone is complete and nothing shows twice. It costs one event per record per resume.
    records = [r for r in kept if r.get("step", 0) >= 1] if resume_step else []
    purge_step = min([r["step"] for r in records] + [resume_step + 1]) if resume_step else None
    self._tb = _EventFile(workdir_lib.path(workdir, workdir_lib.TENSORBOARD_DIR), purge_step)
    for record in records:
      self._add_scalars(record["step"], {k: v for k, v in record.items() if k != "step"})
    self.flush()

  def _truncate_after(self, step: int) -> list[dict[str, Any]]:
    """Drops the records past `step` (on resume unparseable lines stay as they were); returns the records kept."""
    lines = _read_lines(self.path) if paths.as_path(self.path).exists() else []
    kept = [(line, r) for line, r in lines if (r is None and step > 0) or (r is not None and r.get("step", 0) <= step)]
    text = "".join((json.dumps(record) if record is not None else line.rstrip("\n")) + "\n" for line, record in kept)
    paths.write_atomic(self.path, text)
    self._text = None if paths.is_local(self.path) else text
    return [r for _, r in kept if r is not None]

  def _add_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for name, value in scalars.items():
      if isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(name, float(value), step)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    line = json.dumps({"step": int(step), **clean}) + "\n"
    if self._text is None:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(line)
    else:
      self._text += line
      paths.write_atomic(self.path, self._text)
    self._add_scalars(step, clean)
    # Flushed at each write, so a killed run keeps its scalars; writes come once per log_every steps.
    self._tb.flush()

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def console(message: str) -> None:
  """A line on the console (stdout, flushed) from process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)
