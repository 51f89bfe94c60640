"""Prints (and with --run executes) the gcloud commands for a Cloud TPU VM or pod slice run of llm_jax.

Command:  python experiments/tpu_launch.py --name=llm-jax-v5e --zone=us-west4-a --accelerator=v5litepod-8 \
            --job="train --config=experiments/sotu_small.py --workdir=/tmp/runs/sotu" [--run]
          Steps: create, install, start, logs, delete (--steps=create,install,start picks some).
The `--job` is run as `python -m llm_jax.<job>` on every worker with `--distributed`, so a pod slice's
workers find each other through `jax.distributed.initialize()`. A sweep (`--job="sweep --sweep=...
--root=..."`) runs the same way: the sweep hands `--distributed` on to each training run it starts.
"""

import shlex
import subprocess
import sys

from absl import app
from absl import flags

_NAME = flags.DEFINE_string("name", "llm-jax", "TPU VM name.")
_ZONE = flags.DEFINE_string("zone", "us-central2-b", "Zone of the TPU VM.")
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's configured one).")
_ACCELERATOR = flags.DEFINE_string("accelerator", "v5litepod-8", "Accelerator type, e.g. v5litepod-8, v5p-64.")
_VERSION = flags.DEFINE_string("version", None, "TPU VM software version; default: the one for the accelerator.")
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                    "v6e": "v2-alpha-tpuv6e"}
_REPO = flags.DEFINE_string("repo", "https://github.com/your-org/llm_jax.git", "Where workers clone llm_jax.")
_JOB = flags.DEFINE_string("job", "train --config=experiments/sotu_small.py --workdir=$HOME/runs/sotu_small",
                           "llm_jax module and its flags, run on every worker.")
_STEPS = flags.DEFINE_list("steps", ["create", "install", "start", "logs", "delete"], "Which commands.")
_RUN = flags.DEFINE_bool("run", False, "Execute the commands instead of printing them.")
_SPOT = flags.DEFINE_bool("spot", False, "Ask for a Spot (preemptible) VM; llm_jax checkpoints on SIGTERM.")


def _ssh(command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", _NAME.value, f"--zone={_ZONE.value}", *_project(),
          f"--worker={worker}", f"--command={command}"]


def _project() -> list[str]:
  return [f"--project={_PROJECT.value}"] if _PROJECT.value else []


def commands() -> dict[str, list[str]]:
  """The gcloud command line of every step, in order."""
  module, _, args = _JOB.value.partition(" ")
  version = _VERSION.value or RUNTIME_VERSIONS.get(_ACCELERATOR.value.split("-")[0], "tpu-ubuntu2204-base")
  install = (f"git clone {_REPO.value} llm_jax || (cd llm_jax && git pull); cd llm_jax && "
             "python3 -m venv .venv && . .venv/bin/activate && pip install -q -r requirements.txt -e . && "
             'pip install -q "jax[tpu]==0.10.2"')
  start = ("cd llm_jax && . .venv/bin/activate && "
           f"nohup python -m llm_jax.{module} --distributed {args} > $HOME/llm_jax.log 2>&1 &")
  return {
      "create": ["gcloud", "compute", "tpus", "tpu-vm", "create", _NAME.value, f"--zone={_ZONE.value}",
                 *_project(), f"--accelerator-type={_ACCELERATOR.value}", f"--version={version}",
                 *(["--spot"] if _SPOT.value else [])],
      "install": _ssh(install),
      "start": _ssh(start),
      "logs": _ssh("tail -n 100 -f $HOME/llm_jax.log", worker="0"),
      "delete": ["gcloud", "compute", "tpus", "tpu-vm", "delete", _NAME.value, f"--zone={_ZONE.value}",
                 *_project(), "--quiet"],
  }


def main(argv):
  del argv
  all_commands = commands()
  unknown = [s for s in _STEPS.value if s not in all_commands]
  if unknown:
    sys.exit(f"tpu_launch: error: unknown step(s) {unknown}; choose from {', '.join(all_commands)}")
  for step in _STEPS.value:
    line = shlex.join(all_commands[step])
    print(f"# {step}\n{line}", flush=True)
    if _RUN.value:
      subprocess.run(all_commands[step], check=True)


if __name__ == "__main__":
  app.run(main)
