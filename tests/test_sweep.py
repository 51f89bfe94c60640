"""Sweeps: expansion (grid, zip, seeds), validation, skipping finished runs, the report's numbers and plots."""

import csv
import glob
import json
import os
import subprocess

import numpy as np
import pytest
from conftest import REPO
from conftest import assert_cli_error
from conftest import raises_one_line
from conftest import run_module

from llm_jax import errors
from llm_jax import writers
from llm_jax.sweeps import plan
from llm_jax.sweeps import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_sweep(tmp_path, body: str) -> str:
  path = tmp_path / "sweep.py"
  path.write_text(body)
  return str(path)


def _fake_run(run: plan.Run, status: str, val_losses=(), **config) -> None:
  """A workdir as the trainer leaves it: config.json, run.json (status, params, wall time) and metrics.jsonl."""
  os.makedirs(run.workdir, exist_ok=True)
  card = {"status": status, "num_params": 1000, "wall_time_s": 10.0 + run.seed}
  with open(os.path.join(run.workdir, "run.json"), "w", encoding="utf-8") as f:
    json.dump(card, f)
  with open(os.path.join(run.workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump({**_nested(run.settings), **config}, f)
  with open(os.path.join(run.workdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
    for i, loss in enumerate(val_losses, 1):
      f.write(json.dumps({"step": 10 * i, "loss": loss + 0.1, "tokens_per_s": 100.0 * i, "mfu": 0.1 * i}) + "\n")
      f.write(json.dumps({"step": 10 * i, "val_loss": loss}) + "\n")


def _nested(settings: dict) -> dict:
  tree: dict = {}
  for key, value in settings.items():
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def test_grid_times_seeds(tmp_path):
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nSEEDS = (0, 1)\n'
                      'GRID = {"model.family": ["gpt2", "llama"], "optim.learning_rate": [1e-3, 3e-3]}\n'
                      'OVERRIDES = {"num_train_steps": 5}\n')
  runs = plan.expand(plan.load_sweep(path), str(tmp_path / "root"))
  assert [r.name for r in runs] == [f"model.family={f},optim.learning_rate={lr},seed={s}"
                                    for f in ("gpt2", "llama") for lr in ("0.001", "0.003") for s in (0, 1)]
  assert len({r.variant for r in runs}) == 4
  assert runs[3].command[1:] == ["-m", "llm_jax.train", "--config=experiments/smoke.py",
                                 f"--workdir={tmp_path / 'root' / runs[3].name}", "--config.num_train_steps=5",
                                 "--config.model.family=gpt2", "--config.optim.learning_rate=0.003", "--config.seed=1"]


def test_zip_times_seeds_and_grid_times_zip(tmp_path):
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py:llama"\nSEEDS = (0, 1, 2)\n'
                      'ZIP = {"model.d_model": [64, 128], "model.num_heads": [2, 4]}\n')
  runs = plan.expand(plan.load_sweep(path), str(tmp_path))
  assert [r.point for r in runs[::3]] == [{"model.d_model": 64, "model.num_heads": 2},
                                          {"model.d_model": 128, "model.num_heads": 4}]
  assert [r.seed for r in runs] == [0, 1, 2, 0, 1, 2]
  assert runs[0].name == "model.d_model=64,model.num_heads=2,seed=0"
  assert "--config=experiments/smoke.py:llama" in runs[0].command
  both = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nGRID = {"optim.name": ["adamw", "sgd"]}\n'
                      'ZIP = {"model.d_model": [64, 128], "model.num_heads": [2, 4]}\n')
  names = [r.name for r in plan.expand(plan.load_sweep(both), str(tmp_path))]
  assert names == [f"optim.name={o},model.d_model={d},model.num_heads={h},seed=0"
                   for o in ("adamw", "sgd") for d, h in ((64, 2), (128, 4))]


def test_workdir_names_are_file_system_safe_and_distinct(tmp_path):
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\n'
                      'GRID = {"sample.prompt": ["a/b c", "x" * 300]}\n')
  runs = plan.expand(plan.load_sweep(path), str(tmp_path))
  assert runs[0].name == "sample.prompt=a-b-c,seed=0"
  assert len(runs[1].variant.encode()) <= 200 and "/" not in runs[1].name
  clash = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nGRID = {"sample.prompt": ["a/b", "a b"]}\n')
  with raises_one_line(errors.ConfigError, clash, "'sample.prompt=a-b,seed=0'"):
    plan.expand(plan.load_sweep(clash), str(tmp_path))


# Each names the offending key, section or value of the sweep file ({path}: the file itself).
@pytest.mark.parametrize("body, fragments", [
    ('BASE = "experiments/smoke.py"\nGRID = {"model.widht": [1]}\n', ("{path}", "'model.widht'", "GRID")),
    ('BASE = "experiments/smoke.py"\nZIP = {"optim.learning_rat": [1e-3]}\n',
     ("{path}", "'optim.learning_rat'", "ZIP", "did you mean optim.learning_rate?")),
    ('BASE = "experiments/smoke.py"\nZIP = {"optim.b1": [0.9, 0.8], "model.d_model": [64]}\n',
     ("{path}", "ZIP", "[1, 2]")),
    ('GRID = {}\n', ("{path}", "BASE")),
    ('BASE = "experiments/nope.py"\n', ("BASE='experiments/nope.py'",)),
    ('BASE = "experiments/smoke.py:gpt3"\n', ("BASE='experiments/smoke.py:gpt3'", "'gpt3'")),
    ('BASE = "experiments/smoke.py"\nGRID = {"seed": [1, 2]}\n', ("{path}", "GRID", "'seed'", "SEEDS")),
    ('BASE = "experiments/smoke.py"\nGRID = {"model.d_model": [64]}\nOVERRIDES = {"model.d_model": 32}\n',
     ("{path}", "'model.d_model'", "GRID", "OVERRIDES")),
    ('BASE = "experiments/smoke.py"\nGRID = {"model.family": ["gpt2", "gpt3"]}\n',
     ("{path}", "model.family='gpt3'", "seed=0")),
    ('BASE = "experiments/smoke.py"\nOVERRIDES = {"num_train_steps": "many"}\n', ("{path}", "num_train_steps='many'")),
    ('BASE = "experiments/smoke.py"\nGRID = {"model.family": "gpt2"}\n', ("{path}", "GRID['model.family']", "'gpt2'")),
    ('BASE = "experiments/smoke.py"\nSEEDS = ()\n', ("{path}", "SEEDS", "()")),
    ('BASE = "experiments/smoke.py"\n1 / 0\n', ("{path}", "ZeroDivisionError")),
])
def test_bad_sweep_files_are_refused(tmp_path, body, fragments):
  path = _write_sweep(tmp_path, body)
  with raises_one_line(errors.ConfigError, *[f.format(path=path) for f in fragments]):
    plan.load_sweep(path)


@pytest.mark.parametrize("path", sorted(p for p in glob.glob(os.path.join(REPO, "experiments", "*.py"))
                                        if "\nBASE = " in open(p, encoding="utf-8").read()))
def test_every_sweep_file_in_experiments_validates(path):
  assert plan.expand(plan.load_sweep(path), "/tmp/unused")


@pytest.mark.slow
def test_finished_runs_are_skipped_and_unfinished_resumed(tmp_path, monkeypatch):
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nSEEDS = (0, 1, 2, 3)\n')
  runs = plan.expand(plan.load_sweep(path), str(tmp_path / "root"))
  for run, status in zip(runs, ("finished", "stopped", "failed")):
    _fake_run(run, status)
  assert [plan.status(r) for r in runs] == ["finished", "stopped", "failed", "new"]
  launched = []
  monkeypatch.setattr(plan.subprocess, "run",
                      lambda cmd, **kw: launched.append(cmd) or subprocess.CompletedProcess(cmd, 0))
  outcome = plan.run_all(runs, log=lambda _: None)
  assert outcome == {runs[0].name: "skipped", **{r.name: "ok" for r in runs[1:]}}
  assert launched == [r.command for r in runs[1:]]
  launched.clear()
  plan.run_all(runs, skip_finished=False, log=lambda _: None)  # a pod-slice worker starts them all
  assert launched == [r.command for r in runs]


@pytest.mark.slow
def test_a_failing_run_does_not_stop_the_sweep(tmp_path, monkeypatch):
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nSEEDS = (0, 1)\n')
  runs = plan.expand(plan.load_sweep(path), str(tmp_path))
  codes = iter([1, 0])
  monkeypatch.setattr(plan.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, next(codes)))
  outcome = plan.run_all(runs, log=lambda _: None)
  assert outcome[runs[0].name].startswith("failed (exit 1") and outcome[runs[1].name] == "ok"


def test_a_derived_setting_is_compared_as_the_run_recorded_it(tmp_path):
  # model.num_kv_heads=0 means "num_heads": config.json records the 4 it resolved to, which is not a stale setting.
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nOVERRIDES = {"model.num_kv_heads": 0}\n')
  run = plan.expand(plan.load_sweep(path), str(tmp_path))[0]
  assert run.resolved["model.num_kv_heads"] == 4 and run.settings["model.num_kv_heads"] == 0
  _fake_run(run, "finished", model={"num_kv_heads": 4})
  assert plan.stale_settings(run) == {}
  _fake_run(run, "finished", model={"num_kv_heads": 2})
  assert plan.stale_settings(run) == {"model.num_kv_heads": (2, 0)}


def test_a_workdir_run_with_other_settings_is_refused(tmp_path):
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nOVERRIDES = {"num_train_steps": 12}\n')
  run = plan.expand(plan.load_sweep(path), str(tmp_path))[0]
  _fake_run(run, "finished", num_train_steps=30)
  assert plan.stale_settings(run) == {"num_train_steps": (30, 12)}
  with raises_one_line(errors.ConfigError, run.workdir, "num_train_steps=30", "12"):
    plan.run_all([run], log=lambda _: None)


def test_report_aggregates_seeds_and_marks_differences_beyond_the_noise(tmp_path):
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nSEEDS = (0, 1, 2)\n'
                      'GRID = {"optim.learning_rate": [0.001, 0.003, 0.01]}\n')
  sweep = plan.load_sweep(path)
  runs = plan.expand(sweep, str(tmp_path))
  finals = {0.001: [4.0, 4.1, 4.2], 0.003: [4.05, 4.15, 4.25], 0.01: [5.0, 5.1, 5.2]}
  for run in runs:
    final = finals[run.point["optim.learning_rate"]][run.seed]
    _fake_run(run, "finished" if run.name != runs[-1].name else "running", (final + 1.0, final - 0.5, final))
  result = report.write_report(sweep, str(tmp_path))
  rows = {r["optim.learning_rate"]: r for r in result.rows}
  assert [r["optim.learning_rate"] for r in result.rows] == [0.001, 0.003, 0.01]  # best first
  assert rows[0.001]["final_val_loss_mean"] == pytest.approx(4.1)
  assert rows[0.001]["final_val_loss_std"] == pytest.approx(0.1)
  assert rows[0.001]["best_val_loss_mean"] == pytest.approx(3.6)
  assert rows[0.01]["n"] == 2 and rows[0.01]["final_val_loss_mean"] == pytest.approx(5.05)
  assert result.missing == [runs[-1].name]
  # 0.05 apart with std 0.1 each is noise; 0.95 apart with std 0.1 and 0.07 is not.
  assert not rows[0.003]["final_val_loss_beyond_noise"] and rows[0.01]["final_val_loss_beyond_noise"]
  assert rows[0.001]["wall_time_s_mean"] == pytest.approx(11.0)  # seeds 0, 1, 2: 10, 11, 12 s
  assert rows[0.001]["tokens_per_s_mean"] == pytest.approx(200.0)  # median of 100, 200, 300
  assert "| optim.learning_rate=0.01 | 2 | 5.0500 ± 0.0707 | +0.9500 † |" in result.table
  assert "| optim.learning_rate=0.003 | 3 | 4.1500 ± 0.1000 | +0.0500 |" in result.table
  names = {os.path.basename(f) for f in result.files}
  assert names == {"results.csv", "runs.csv", "results.md", "val_loss_curves.png",
                   "final_val_loss_vs_optim_learning_rate.png"}


def test_report_carries_the_downstream_task_metrics_logged_during_training(tmp_path):
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nSEEDS = (0, 1)\n'
                      'GRID = {"optim.learning_rate": [0.001, 0.003]}\n')
  sweep = plan.load_sweep(path)
  runs = plan.expand(sweep, str(tmp_path))
  accuracy = {(0.001, 0): 0.60, (0.001, 1): 0.50, (0.003, 0): 0.70, (0.003, 1): 0.72}
  for run in runs:
    _fake_run(run, "finished", (4.0, 3.9))
    lr = run.point["optim.learning_rate"]
    with open(os.path.join(run.workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:  # an early value, then the last
      f.write(json.dumps({"step": 10, "zero_shot/party/accuracy": 0.1, "harness/t/acc": 0.2}) + "\n")
      f.write(json.dumps({"step": 20, "zero_shot/party/accuracy": accuracy[lr, run.seed]}) + "\n")
  result = report.write_report(sweep, str(tmp_path))
  rows = {r["optim.learning_rate"]: r for r in result.rows}
  assert rows[0.001]["zero_shot/party/accuracy_mean"] == pytest.approx(0.55)
  assert rows[0.001]["zero_shot/party/accuracy_std"] == pytest.approx(0.0707107, abs=1e-6)  # sqrt(0.005)
  assert rows[0.003]["zero_shot/party/accuracy_mean"] == pytest.approx(0.71)
  assert rows[0.003]["harness/t/acc_mean"] == pytest.approx(0.2)  # logged once: that value is the last
  assert "zero_shot/party/accuracy |" in result.table and "| 0.5500 ± 0.0707 |" in result.table
  names = {os.path.basename(f) for f in result.files}
  assert {"zero_shot_party_accuracy_vs_optim_learning_rate.png", "harness_t_acc_vs_optim_learning_rate.png"} <= names


def _finished_val_losses(workdir) -> list[float]:
  return [r["val_loss"] for r in writers.read_metrics(str(workdir)) if "val_loss" in r]


@pytest.mark.slow
def test_tiny_sweep_runs_resumes_and_reports_the_metrics_files(tmp_path):
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nSEEDS = (0, 1)\n'
                      'GRID = {"model.family": ["gpt2", "llama"]}\n'
                      'OVERRIDES = {"num_train_steps": 6, "eval_every": 3, "log_every": 3, "checkpoint_every": 3, '
                      '"sample.num_return_sequences": 1}\n')
  root = tmp_path / "root"
  result = run_module("llm_jax.sweep", f"--sweep={path}", f"--root={root}")
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  again = run_module("llm_jax.sweep", f"--sweep={path}", f"--root={root}")
  assert again.returncode == 0 and again.stdout.count("finished, skipped") == 4, again.stdout
  reported = run_module("llm_jax.sweep", "--report", f"--root={root}")  # the sweep file from sweep.json
  assert reported.returncode == 0, reported.stderr[-2000:]
  with open(root / "results.csv", encoding="utf-8") as f:
    rows = {r["variant"]: r for r in csv.DictReader(f)}
  assert set(rows) == {"model.family=gpt2", "model.family=llama"}
  for family in ("gpt2", "llama"):
    curves = [_finished_val_losses(root / f"model.family={family},seed={s}") for s in (0, 1)]
    assert all(len(c) == 2 for c in curves)  # steps 3 and 6
    finals, bests = [c[-1] for c in curves], [min(c) for c in curves]
    row = rows[f"model.family={family}"]
    assert row["n"] == "2" and row["model.family"] == family
    assert float(row["final_val_loss_mean"]) == pytest.approx(np.mean(finals), rel=1e-12)
    assert float(row["final_val_loss_std"]) == pytest.approx(np.std(finals, ddof=1), rel=1e-12)
    assert float(row["best_val_loss_mean"]) == pytest.approx(np.mean(bests), rel=1e-12)
    assert f"| model.family={family} | 2 | {np.mean(finals):.4f} ± {np.std(finals, ddof=1):.4f} |" in (
        (root / "results.md").read_text(encoding="utf-8"))
    assert f"{np.mean(finals):.4f} ± {np.std(finals, ddof=1):.4f}" in reported.stdout
  for name in ("val_loss_curves.png", "final_val_loss_vs_model_family.png"):
    data = (root / name).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
  with open(root / "runs.csv", encoding="utf-8") as f:
    assert len(list(csv.DictReader(f))) == 4


@pytest.mark.slow
def test_list_shows_runs_and_commands(tmp_path):
  path = _write_sweep(tmp_path, 'BASE = "experiments/smoke.py"\nGRID = {"model.family": ["gpt2", "llama"]}\n')
  result = run_module("llm_jax.sweep", f"--sweep={path}", f"--root={tmp_path / 'root'}", "--list")
  assert result.returncode == 0, result.stderr
  assert "# model.family=llama,seed=0 [new]" in result.stdout
  assert (f"-m llm_jax.train --config=experiments/smoke.py --workdir={tmp_path}/root/model.family=llama,seed=0 "
          "--config.model.family=llama --config.seed=0") in result.stdout
  assert "# 2 runs, 0 finished" in result.stdout
  assert not (tmp_path / "root").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args, fragments", [
    (["--report", "--root={tmp}/nope"], ("--root={tmp}/nope",)),
    (["--report", "--root={tmp}"], ("{tmp}", "sweep.json")),
    (["--root={tmp}"], ("--sweep",)),
    (["--sweep={sweep}", "--root={tmp}", "--report", "--list"], ("--report", "--list")),
    (["--sweep={tmp}/bad.py", "--root={tmp}"], ("{tmp}/bad.py", "'optim.lr'")),
])
def test_sweep_command_line_errors_are_one_line(tmp_path, args, fragments):
  (tmp_path / "bad.py").write_text('BASE = "experiments/smoke.py"\nGRID = {"optim.lr": [1.0]}\n')
  fill = lambda s: s.format(tmp=tmp_path, sweep=os.path.join(REPO, "experiments", "ablation_family.py"))
  result = run_module("llm_jax.sweep", *[fill(a) for a in args])
  assert_cli_error(result, "sweep", *[fill(f) for f in fragments])


SWEEP_FILES = {"ablation_optimizer": 6, "ablation_optimizer_seeds": 6, "ablation_knobs": 18, "sft_party_sweep": 6}


@pytest.mark.parametrize("name", sorted(SWEEP_FILES))
def test_the_committed_sweeps_expand_into_valid_runs(name, tmp_path):
  sweep = plan.load_sweep(os.path.join(REPO, "experiments", f"{name}.py"))
  runs = plan.expand(sweep, str(tmp_path), [])  # validates every run's resolved config
  assert len(runs) == SWEEP_FILES[name]
