"""Where metrics go: `metrics.jsonl`, TensorBoard event files and the console (process 0 only)."""

from __future__ import annotations

import json
import math
import os
from typing import Any
from typing import Mapping

import jax

from llm_jax import workdir as workdir_lib


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of a run's metrics.jsonl (empty when there is none)."""
  path = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
  """Appends one JSON object per step; on resume drops records past the resumed step first."""

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
    self._tb = None
    if not self.enabled:
      return
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    # purge_step hides events a killed run wrote after the checkpoint we resume from.
    self._tb = SummaryWriter(workdir_lib.path(workdir, workdir_lib.TENSORBOARD_DIR),
                             purge_step=resume_step + 1 if resume_step else None)

  def _truncate_after(self, step: int) -> None:
    kept = [r for r in read_metrics(os.path.dirname(self.path)) if r.get("step", 0) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for record in kept:
        f.write(json.dumps(record) + "\n")
    os.replace(tmp, self.path)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")
    for name, value in clean.items():
      if math.isfinite(value):
        self._tb.add_scalar(name, value, step)

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
