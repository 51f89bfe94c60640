"""tools/tpu_launch.py: the gcloud commands it prints for a single-host TPU VM and a pod slice (dry run)."""

import os
import subprocess
import sys

from conftest import REPO
from conftest import assert_one_line

SCRIPT = os.path.join(REPO, "tools", "tpu_launch.py")


def _launch(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                        check=False)


def _steps(stdout: str) -> dict[str, list[str]]:
  steps: dict[str, list[str]] = {}
  for line in stdout.splitlines():
    if line.startswith("# "):
      current = steps.setdefault(line[2:], [])
    else:
      current.append(line)
  return steps


def test_single_host_dry_run_prints_every_step():
  out = _launch("--name=vm1", "--zone=us-west4-a", "--accelerator=v5litepod-8", "--project=proj")
  assert out.returncode == 0, out.stderr
  steps = _steps(out.stdout)
  ssh = "gcloud compute tpus tpu-vm ssh vm1 --zone=us-west4-a --project=proj"
  assert steps == {
      "create": ["gcloud compute tpus tpu-vm create vm1 --zone=us-west4-a --project=proj "
                 "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite"],
      "install": [f"git -C {REPO} archive --format=tar.gz --output=/tmp/llm_jax.tar.gz HEAD",
                  "gcloud compute tpus tpu-vm scp /tmp/llm_jax.tar.gz vm1:llm_jax.tar.gz --zone=us-west4-a "
                  "--project=proj --worker=all",
                  f"{ssh} --worker=all '--command=mkdir -p ~/llm_jax && tar -xzf ~/llm_jax.tar.gz -C ~/llm_jax && "
                  "cd ~/llm_jax && python3 -m venv .venv && . .venv/bin/activate && "
                  "pip install -q -r requirements.txt -e . && pip install -q \"jax[tpu]==0.10.2\"'"],
      "start": [f"{ssh} --worker=all '--command=cd ~/llm_jax && . .venv/bin/activate && nohup python -m "
                "llm_jax.train --distributed --config=experiments/sotu_small.py --workdir=$HOME/runs/sotu_small "
                "--config.model.compute_dtype=bfloat16 > $HOME/llm_jax.log 2>&1 < /dev/null &'"],
      "logs": [f"{ssh} --worker=0 '--command=tail -n 100 -f $HOME/llm_jax.log'"],
      "delete": ["gcloud compute tpus tpu-vm delete vm1 --zone=us-west4-a --project=proj --quiet"],
  }


def test_pod_slice_dry_run_runs_a_sweep_on_every_worker():
  out = _launch("--name=pod", "--zone=us-east5-a", "--accelerator=v5p-64", "--spot",
                "--source=https://example.com/llm_jax.git", "--steps=create,install,start",
                "--job=sweep --sweep=experiments/ablation_family.py --root=/mnt/shared/ablation")
  assert out.returncode == 0, out.stderr
  steps = _steps(out.stdout)
  assert list(steps) == ["create", "install", "start"]
  assert steps["create"] == ["gcloud compute tpus tpu-vm create pod --zone=us-east5-a --accelerator-type=v5p-64 "
                             "--version=v2-alpha-tpuv5 --spot"]
  assert steps["install"] == [
      "gcloud compute tpus tpu-vm ssh pod --zone=us-east5-a --worker=all '--command=(git clone "
      "https://example.com/llm_jax.git ~/llm_jax || git -C ~/llm_jax pull --ff-only) && cd ~/llm_jax && "
      "python3 -m venv .venv && . .venv/bin/activate && pip install -q -r requirements.txt -e . && "
      "pip install -q \"jax[tpu]==0.10.2\"'"]
  assert steps["start"] == [
      "gcloud compute tpus tpu-vm ssh pod --zone=us-east5-a --worker=all '--command=cd ~/llm_jax && "
      ". .venv/bin/activate && nohup python -m llm_jax.sweep --distributed --sweep=experiments/ablation_family.py "
      "--root=/mnt/shared/ablation > $HOME/llm_jax.log 2>&1 < /dev/null &'"]


def test_bad_launch_flags_are_one_line_errors():
  for args, fragments in [(["--accelerator=v9-8"], ("--accelerator='v9-8'", "is not one of v4, v5litepod, v5p, v6e")),
                          (["--job=generate --workdir=x"], ("--job='generate --workdir=x'", "'train' or 'sweep'")),
                          (["--steps=create,boot"], ("unknown step(s) boot",)),
                          (["--run"], ("--run", "would delete the VM under the running job"))]:
    out = _launch(*args)
    assert out.returncode == 2 and out.stdout == "", out.stdout
    assert out.stderr.startswith("tpu_launch: error: ") and out.stderr.endswith("\n"), out.stderr
    assert_one_line(out.stderr[:-1], *fragments)


def test_an_explicit_runtime_version_is_used_as_given():
  out = _launch("--accelerator=v6e-256", "--version=v2-alpha-tpuv6e-custom", "--steps=create")
  assert out.stdout.splitlines()[1].endswith("--accelerator-type=v6e-256 --version=v2-alpha-tpuv6e-custom")
