"""Sweeps: expansion (grid, zip, seeds), skipping finished runs, the report's numbers and plots, TPU launch."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from conftest import run_module

from llm_jax import report
from llm_jax import sweeps
from llm_jax import writers


def _write_sweep(tmp_path, body: str) -> str:
  path = tmp_path / "sweep.py"
  path.write_text(body)
  return str(path)


def test_grid_times_seeds(tmp_path):
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nSEEDS = (0, 1)\n'
                      'GRID = {"model.family": ["gpt2", "llama"], "optim.learning_rate": [1e-3, 3e-3]}\n'
                      'OVERRIDES = {"num_train_steps": 5}\n')
  runs = sweeps.expand(sweeps.load_sweep(path), str(tmp_path / "root"))
  assert len(runs) == 2 * 2 * 2
  assert runs[0].name == "model.family=gpt2,optim.learning_rate=0.001,seed=0"
  assert runs[-1].name == "model.family=llama,optim.learning_rate=0.003,seed=1"
  assert len({r.workdir for r in runs}) == 8 and len({r.variant for r in runs}) == 4
  assert "--config.num_train_steps=5" in runs[0].command and "--config.seed=1" in runs[1].command
  assert f"--workdir={runs[0].workdir}" in runs[0].command


def test_zip_times_seeds(tmp_path):
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nSEEDS = (0, 1, 2)\n'
                      'ZIP = {"model.d_model": [64, 128], "model.num_heads": [2, 4]}\n')
  runs = sweeps.expand(sweeps.load_sweep(path), str(tmp_path))
  assert [r.point for r in runs[::3]] == [{"model.d_model": 64, "model.num_heads": 2},
                                          {"model.d_model": 128, "model.num_heads": 4}]
  assert [r.seed for r in runs] == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("body, message", [
    ('BASE = "experiments/smoke.py"\nGRID = {"model.widht": [1]}\n', "unknown config key 'model.widht'"),
    ('BASE = "experiments/smoke.py"\nZIP = {"seed": [1, 2], "model.d_model": [64]}\n', "different lengths"),
    ('GRID = {}\n', "has no BASE"),
    ('BASE = "experiments/nope.py"\n', "does not exist"),
])
def test_bad_sweep_files_are_refused(tmp_path, body, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    sweeps.load_sweep(_write_sweep(tmp_path, body))


def test_finished_runs_are_skipped_and_unfinished_resumed(tmp_path, monkeypatch):
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nSEEDS = (0, 1, 2)\n')
  runs = sweeps.expand(sweeps.load_sweep(path), str(tmp_path / "root"))
  for run, status in zip(runs[:2], ("finished", "running")):
    os.makedirs(run.workdir)
    with open(os.path.join(run.workdir, "run.json"), "w", encoding="utf-8") as f:
      json.dump({"status": status}, f)
  assert [sweeps.status(r) for r in runs] == ["finished", "unfinished", "new"]
  launched = []
  monkeypatch.setattr(sweeps.subprocess, "run",
                      lambda cmd, **kw: launched.append(cmd) or subprocess.CompletedProcess(cmd, 0))
  outcome = sweeps.run_all(runs, log=lambda _: None)
  assert outcome == {runs[0].name: "skipped", runs[1].name: "ok", runs[2].name: "ok"}
  assert launched == [runs[1].command, runs[2].command]


@pytest.mark.slow
def test_tiny_sweep_report_matches_the_metrics_files(tmp_path):
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nSEEDS = (0, 1)\n'
                      'GRID = {"model.family": ["gpt2", "llama"]}\n'
                      'OVERRIDES = {"num_train_steps": 6, "eval_every": 3, "log_every": 3, "checkpoint_every": 3, '
                      '"sample.max_length": 12}\n')
  root = tmp_path / "root"
  result = run_module("llm_jax.sweep", f"--sweep={path}", f"--root={root}")
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  again = run_module("llm_jax.sweep", f"--sweep={path}", f"--root={root}")
  assert again.stdout.count("finished, skipped") == 4
  reported = run_module("llm_jax.sweep", f"--sweep={path}", f"--root={root}", "--report")
  assert reported.returncode == 0, reported.stderr[-2000:]
  for name in ("results.csv", "runs.csv", "results.md", "val_loss_curves.png", "final_loss_vs_model_family.png"):
    assert (root / name).exists(), name
  with open(root / "results.csv", encoding="utf-8") as f:
    rows = {r["variant"]: r for r in csv.DictReader(f)}
  sweep = sweeps.load_sweep(path)
  for family in ("gpt2", "llama"):
    finals = [[r["val_loss"] for r in writers.read_metrics(str(root / f"model.family={family},seed={s}"))
               if "val_loss" in r][-1] for s in (0, 1)]
    row = rows[f"model.family={family}"]
    assert float(row["final_val_loss_mean"]) == pytest.approx(np.mean(finals), rel=1e-9)
    assert float(row["final_val_loss_std"]) == pytest.approx(np.std(finals, ddof=1), rel=1e-9)
    assert row["n"] == "2"
  assert "model.family=gpt2" in (root / "results.md").read_text()
  assert len(report.write_report(sweep, str(root))["plots"]) == 2


def test_dry_run_lists_runs_and_commands(tmp_path):
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nGRID = {"model.family": ["gpt2", "llama"]}\n')
  result = run_module("llm_jax.sweep", f"--sweep={path}", f"--root={tmp_path / 'root'}", "--dry_run")
  assert result.returncode == 0, result.stderr
  assert "# model.family=llama,seed=0 [new]" in result.stdout
  assert "-m llm_jax.train --config=experiments/smoke.py" in result.stdout
  assert not (tmp_path / "root").exists()


def test_tpu_launch_dry_run_prints_the_gcloud_commands():
  def launch(*args):
    out = subprocess.run([sys.executable, "experiments/tpu_launch.py", *args], cwd=REPO, capture_output=True,
                         text=True, check=True)
    return out.stdout
  single = launch("--name=vm1", "--zone=us-west4-a", "--accelerator=v5litepod-8")
  assert ("gcloud compute tpus tpu-vm create vm1 --zone=us-west4-a --accelerator-type=v5litepod-8 "
          "--version=v2-alpha-tpuv5-lite") in single
  assert "--worker=all" in single and 'pip install -q "jax[tpu]==0.10.2"' in single
  assert "nohup python -m llm_jax.train --distributed --config=experiments/sotu_small.py" in single
  assert "ssh vm1 --zone=us-west4-a --worker=0 '--command=tail -n 100 -f $HOME/llm_jax.log'" in single
  assert "gcloud compute tpus tpu-vm delete vm1 --zone=us-west4-a --quiet" in single
  pod = launch("--name=pod", "--accelerator=v5p-64", "--spot", "--steps=create,start",
               "--job=sweep --sweep=experiments/ablation_family.py --root=/tmp/abl")
  assert "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5 --spot" in pod
  assert "python -m llm_jax.sweep --distributed --sweep=experiments/ablation_family.py --root=/tmp/abl" in pod
  # ... and the sweep hands --distributed on to every training run it starts.
  path = os.path.join(REPO, "experiments", "ablation_family.py")
  assert sweeps.expand(sweeps.load_sweep(path), "/tmp/abl", ("--distributed",))[0].command[-1] == "--distributed"
  assert "# install" not in pod and "# delete" not in pod
