"""The profiler switch: which steps `profile_steps` names, and a `jax.profiler` trace of exactly those steps."""

from __future__ import annotations

import dataclasses
import os

import jax

from llm_jax import errors


def parse_steps(spec: str | tuple[int, int], num_train_steps: int) -> tuple[int, int] | None:
  """(first, last) step to trace from 'START,END' (or a tuple); None for ''; a one-line ValueError if bad."""
  text = ",".join(str(v) for v in spec) if isinstance(spec, (tuple, list)) else str(spec)
  text = text.strip().strip("()")
  if not text:
    return None
  parts = [p.strip() for p in text.split(",")]
  ok = len(parts) == 2 and all(p.isdigit() for p in parts)
  first, last = (int(parts[0]), int(parts[1])) if ok else (0, 0)
  if not ok or not 1 <= first < last <= num_train_steps:
    raise errors.ConfigError(f"profile_steps={spec!r} must be 'START,END' with 1 <= START < END <= "
                             f"num_train_steps={num_train_steps}; e.g. --config.profile_steps=10,15")
  return first, last


@dataclasses.dataclass
class StepProfiler:
  """Starts a trace before step `first` and stops it once step `last` has finished (process 0 only).

  jax.profiler writes `<log_dir>/plugins/profile/<run>/*.xplane.pb`, which the TensorBoard profile plugin
  (and Perfetto, through xprof) read; the trace covers every backend, CPU included.
  """

  steps: tuple[int, int] | None
  log_dir: str
  active: bool = False

  def before_step(self, step: int) -> None:
    if self.steps is not None and step == self.steps[0] and jax.process_index() == 0:
      os.makedirs(self.log_dir, exist_ok=True)
      jax.profiler.start_trace(self.log_dir)
      self.active = True

  def after_step(self, step: int, outputs: object) -> None:
    if self.active and step == self.steps[1]:
      jax.block_until_ready(outputs)  # the trace must hold the last step's device work, not just its dispatch
      self.stop()

  def stop(self) -> None:
    """Ends a running trace (also when the loop stops early, so no trace is left open)."""
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
