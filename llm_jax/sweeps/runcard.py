"""The run card `run.json`: what ran (config, code version, packages, devices), when, and how it ended."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import subprocess
from typing import Any

import jax

from llm_jax import errors
from llm_jax import paths
from llm_jax import workdir as workdir_lib

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets",
            "sentencepiece", "numpy")


def _git(*args: str) -> str | None:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def code_version() -> dict[str, Any]:
  commit = _git("rev-parse", "HEAD")
  status = _git("status", "--porcelain", "--untracked-files=no")
  return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str]:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return versions


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read(workdir: str) -> dict[str, Any] | None:
  path = workdir_lib.path(workdir, workdir_lib.RUN_FILE)
  if not paths.as_path(path).exists():
    return None
  text = paths.as_path(path).read_text(encoding="utf-8")
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise errors.RunError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); it is the run card (status, times, "
                          "final metrics): fix it, or move it away to start a new card") from None


def _write(workdir: str, card: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  paths.write_atomic(workdir_lib.path(workdir, workdir_lib.RUN_FILE), json.dumps(card, indent=2, default=str))


def start(workdir: str, num_params: int) -> dict[str, Any]:
  """Writes the card at start-up (status 'running'); a resumed run keeps its first start time. The config it ran
  with is config.json's, beside it (`workdir.read_run_config`)."""
  previous = read(workdir) or {}
  card = {
      "status": "running",
      "num_params": num_params,
      **code_version(),
      "packages": package_versions(),
      "device_kind": jax.devices()[0].device_kind,
      "device_count": jax.device_count(),
      "process_count": jax.process_count(),
      "start_time": previous.get("start_time", _now()),
      "resumed_at": previous.get("resumed_at", []) + ([_now()] if previous else []),
      "end_time": None,
      "wall_time_s": float(previous.get("wall_time_s", 0.0)),
      "final_metrics": {},
  }
  _write(workdir, card)
  return card


def finish(workdir: str, card: dict[str, Any], status: str, final_metrics: dict[str, float],
           wall_time_s: float) -> None:
  """Records how the run ended: 'finished', 'stopped' (stop_at_step or preemption) or 'failed'.

  `wall_time_s` of this invocation is added to the earlier ones'.
  """
  card = {**card, "status": status, "end_time": _now(), "final_metrics": final_metrics,
          "wall_time_s": card["wall_time_s"] + wall_time_s}
  _write(workdir, card)
