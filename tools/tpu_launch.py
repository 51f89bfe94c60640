"""Prints (and with --run executes) the gcloud commands that run llm_jax on a Cloud TPU VM or pod slice.

Command:  python tools/tpu_launch.py --name=llm-jax --zone=us-west4-a --accelerator=v5litepod-8 \
            --job="train --config=experiments/sotu_small.py --workdir=/tmp/runs/sotu \
                   --config.model.compute_dtype=bfloat16" [--steps=create,install,start] [--run]
Steps, in order: create (the VM or slice), install (llm_jax, its pinned stack and jax[tpu] on every
worker), start (the job on every worker, detached, logging to --log), logs (follow worker 0's log),
delete. Without --run nothing is executed; with it the listed steps run one after another, and
following the logs ends with Ctrl-C while the job keeps running.

The job is `python -m llm_jax.<job> --distributed` on every worker, so a pod slice's workers find each
other through `jax.distributed.initialize()` (BUILD.md); a sweep (`--job="sweep --sweep=... --root=..."`)
hands --distributed on to each training run and every worker starts the same runs. On a multi-host
slice, --workdir and --root must be storage every worker sees. `--source` is a git URL to clone; by
default this checkout's HEAD is packed with `git archive` and copied to every worker.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from typing import NoReturn

from absl import app
from absl import flags

_NAME = flags.DEFINE_string("name", "llm-jax", "TPU VM (or slice) name.")
_ZONE = flags.DEFINE_string("zone", "us-central2-b", "Zone of the TPU VM.")
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's configured one).")
_ACCELERATOR = flags.DEFINE_string("accelerator", "v5litepod-8",
                                   "Accelerator type: v5litepod-8 (one host), v5p-64 (a pod slice), ...")
_VERSION = flags.DEFINE_string("version", None, "TPU software version; default: the one for the accelerator.")
_SPOT = flags.DEFINE_bool("spot", False, "A Spot (preemptible) VM; llm_jax checkpoints on SIGTERM and resumes.")
_SOURCE = flags.DEFINE_string("source", "", "Git URL the workers clone; empty: copy this checkout's HEAD.")
_JOB = flags.DEFINE_string("job", "train --config=experiments/sotu_small.py --workdir=$HOME/runs/sotu_small "
                           "--config.model.compute_dtype=bfloat16",
                           "'train ...' or 'sweep ...': the llm_jax module and its flags, run on every worker.")
_LOG = flags.DEFINE_string("log", "$HOME/llm_jax.log", "Log file of the job on every worker.")
_STEPS = flags.DEFINE_list("steps", ["create", "install", "start", "logs", "delete"], "Which steps.")
_RUN = flags.DEFINE_bool("run", False, "Execute the commands instead of only printing them.")

STEPS = ("create", "install", "start", "logs", "delete")
JAX_TPU = "jax[tpu]==0.10.2"  # the same JAX as requirements.txt, with libtpu
ARCHIVE = "/tmp/llm_jax.tar.gz"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runtime images per TPU generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                    "v6e": "v2-alpha-tpuv6e"}


@dataclasses.dataclass(frozen=True)
class Target:
  """Which TPU VM the commands address."""

  name: str
  zone: str
  accelerator: str
  project: str | None = None
  version: str | None = None
  spot: bool = False

  def where(self) -> list[str]:
    return [f"--zone={self.zone}", *([f"--project={self.project}"] if self.project else [])]


def runtime_version(accelerator: str) -> str:
  generation, _, chips = accelerator.rpartition("-")
  if generation not in RUNTIME_VERSIONS or not chips.isdigit():
    raise ValueError(f"--accelerator={accelerator!r} is not one of {', '.join(RUNTIME_VERSIONS)} followed by "
                     "-<cores or chips>, e.g. v5litepod-8; or pass --version=<runtime> as well")
  return RUNTIME_VERSIONS[generation]


def _ssh(t: Target, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", t.name, *t.where(), f"--worker={worker}",
          f"--command={command}"]


def _install(t: Target, source: str) -> list[list[str]]:
  setup = ("cd ~/llm_jax && python3 -m venv .venv && . .venv/bin/activate && "
           f'pip install -q -r requirements.txt -e . && pip install -q "{JAX_TPU}"')
  if source:
    fetch = f"(git clone {shlex.quote(source)} ~/llm_jax || git -C ~/llm_jax pull --ff-only)"
    return [_ssh(t, f"{fetch} && {setup}")]
  return [["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"],
          ["gcloud", "compute", "tpus", "tpu-vm", "scp", ARCHIVE, f"{t.name}:llm_jax.tar.gz", *t.where(),
           "--worker=all"],
          _ssh(t, f"mkdir -p ~/llm_jax && tar -xzf ~/llm_jax.tar.gz -C ~/llm_jax && {setup}")]


def commands(t: Target, *, job: str, source: str = "", log: str = "$HOME/llm_jax.log") -> dict[str, list[list[str]]]:
  """Every step's command lines, in order; `job` is 'train ...' or 'sweep ...' (module, then its flags)."""
  module, _, args = job.strip().partition(" ")
  if module not in ("train", "sweep"):
    raise ValueError(f"--job={job!r} must start with 'train' or 'sweep' (the llm_jax module to run)")
  version = t.version or runtime_version(t.accelerator)
  start = (f"cd ~/llm_jax && . .venv/bin/activate && nohup python -m llm_jax.{module} --distributed {args.strip()} "
           f"> {log} 2>&1 < /dev/null &")
  return {
      "create": [["gcloud", "compute", "tpus", "tpu-vm", "create", t.name, *t.where(),
                  f"--accelerator-type={t.accelerator}", f"--version={version}", *(["--spot"] if t.spot else [])]],
      "install": _install(t, source),
      "start": [_ssh(t, start)],
      "logs": [_ssh(t, f"tail -n 100 -f {log}", worker="0")],
      "delete": [["gcloud", "compute", "tpus", "tpu-vm", "delete", t.name, *t.where(), "--quiet"]],
  }


def _execute(step: str, command: list[str]) -> None:
  try:
    subprocess.run(command, check=True)
  except FileNotFoundError:
    _fail(f"{command[0]} is not installed here; install the Google Cloud SDK (and git), or drop --run")
  except subprocess.CalledProcessError as e:
    _fail(f"step {step} failed (exit {e.returncode}): {shlex.join(command)}")
  except KeyboardInterrupt:
    if step != "logs":
      raise
    print("stopped following the logs; the job keeps running", flush=True)
    sys.exit(0)


def _fail(message: str) -> NoReturn:
  print(f"tpu_launch: error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {' '.join(argv[1:])}; quote the whole --job=\"train ...\"")
  unknown = [s for s in _STEPS.value if s not in STEPS]
  if unknown:
    _fail(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
  if _RUN.value and "start" in _STEPS.value and "delete" in _STEPS.value:
    _fail("--run with both start and delete would delete the VM under the running job; "
          "delete in a later call: --steps=delete --run")
  target = Target(name=_NAME.value, zone=_ZONE.value, accelerator=_ACCELERATOR.value, project=_PROJECT.value,
                  version=_VERSION.value, spot=_SPOT.value)
  try:
    steps = commands(target, job=_JOB.value, source=_SOURCE.value, log=_LOG.value)
  except ValueError as e:
    _fail(str(e))
  for step in [s for s in STEPS if s in _STEPS.value]:
    print(f"# {step}", flush=True)
    for command in steps[step]:
      print(shlex.join(command), flush=True)
      if _RUN.value:
        _execute(step, command)


if __name__ == "__main__":
  app.run(main)
