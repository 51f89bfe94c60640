"""metrics.jsonl and TensorBoard agree after kills and resumes; one bad metrics line never stops a run."""

import glob
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from conftest import tensorboard_events
from tensorboardX.proto import event_pb2

from llm_jax import writers


def tensorboard_scalars(workdir: str, tag: str) -> dict[int, float]:
  """What TensorBoard shows for `tag`: event files in order, a session START at step s purging older steps >= s."""
  shown: dict[int, float] = {}
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
    for event in tensorboard_events(path):
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        shown = {s: v for s, v in shown.items() if s < event.step}
      if event.HasField("summary"):
        for value in event.summary.value:
          if value.tag == tag:
            shown[event.step] = value.simple_value
  return dict(sorted(shown.items()))


def _jsonl_scalars(workdir: str, tag: str) -> dict[int, float]:
  return {r["step"]: r[tag] for r in writers.read_metrics(workdir) if tag in r}


_KILLED_WRITER = """
import os, signal, sys
from llm_jax import writers
w = writers.MetricWriter(sys.argv[1], resume_step=int(sys.argv[2]))
for step in range(int(sys.argv[2]) + 10, int(sys.argv[3]) + 1, 10):
  w.write(step, {"loss": 10.0 - step / 10})
os.kill(os.getpid(), signal.SIGKILL)
"""


def _write_then_sigkill(workdir: str, resume_step: int, last: int) -> None:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  result = subprocess.run([sys.executable, "-c", _KILLED_WRITER, workdir, str(resume_step), str(last)], cwd=REPO,
                          env=env, capture_output=True, text=True, check=False, timeout=120)
  assert result.returncode == -9, result.stderr[-2000:]


def test_tensorboard_matches_metrics_after_sigkills_and_resumes(tmp_path):
  workdir = str(tmp_path)
  _write_then_sigkill(workdir, 0, 30)  # killed after step 30 was logged; checkpoint 20 survives
  assert list(tensorboard_scalars(workdir, "loss")) == [10, 20, 30]  # flushed at each write
  _write_then_sigkill(workdir, 20, 40)  # resumed from 20, killed again after 40
  writer = writers.MetricWriter(workdir, resume_step=30)
  writer.write(40, {"loss": 6.5})
  writer.write(50, {"loss": 5.0})
  writer.close()
  assert tensorboard_scalars(workdir, "loss") == _jsonl_scalars(workdir, "loss")
  assert list(tensorboard_scalars(workdir, "loss")) == [10, 20, 30, 40, 50]


def test_resume_rebuilds_scalars_that_no_event_file_holds(tmp_path):
  """What runs before the per-write flush left: complete metrics.jsonl, empty event files."""
  workdir = str(tmp_path)
  with open(tmp_path / "metrics.jsonl", "w", encoding="utf-8") as f:
    for step in (10, 20, 30):
      f.write(json.dumps({"step": step, "loss": 7.0 - step / 10}) + "\n")
  os.makedirs(tmp_path / "tensorboard")
  (tmp_path / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"")
  writer = writers.MetricWriter(workdir, resume_step=20)
  writer.write(30, {"loss": 4.5})
  writer.close()
  assert tensorboard_scalars(workdir, "loss") == {10: 6.0, 20: 5.0, 30: 4.5} == _jsonl_scalars(workdir, "loss")


def test_truncated_last_metrics_line_is_dropped_silently(tmp_path, capsys):
  (tmp_path / "metrics.jsonl").write_text('{"step": 10, "loss": 5.0}\n{"step": 20, "lo', encoding="utf-8")
  assert writers.read_metrics(str(tmp_path)) == [{"step": 10, "loss": 5.0}]
  assert capsys.readouterr().err == ""
  writer = writers.MetricWriter(str(tmp_path), resume_step=10)
  writer.write(20, {"loss": 4.0})
  writer.close()
  assert writers.read_metrics(str(tmp_path)) == [{"step": 10, "loss": 5.0}, {"step": 20, "loss": 4.0}]


def test_a_bad_metrics_line_is_skipped_with_a_warning_naming_it(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 10, "loss": 5.0}\ngarbage\n{"step": 20, "loss": 4.0}\n', encoding="utf-8")
  assert [r["step"] for r in writers.read_metrics(str(tmp_path))] == [10, 20]
  err = capsys.readouterr().err
  assert f"{path} line 2" in err and len(err.strip().splitlines()) == 1
  writer = writers.MetricWriter(str(tmp_path), resume_step=20)  # resumable; the bad line is kept, not erased
  writer.close()
  assert "garbage" in path.read_text(encoding="utf-8")


@pytest.mark.slow
def test_writing_tensorboard_events_does_not_load_torch(tmp_path):
  # tensorboardX's package imports torch when installed (as it is here, for the PyTorch reference): 1.5 s of every
  # run's start-up. The writer hides it during that import, and torch still imports afterwards.
  script = ("import sys\nfrom llm_jax import writers\nw = writers.MetricWriter(sys.argv[1], resume_step=0)\n"
            "w.write(1, {'loss': 2.5})\nw.close()\nloaded = 'torch' in sys.modules\nimport torch\n"
            "print(loaded, torch.ones(2).sum().item())\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, check=False, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["False", "2.0"]
  assert tensorboard_scalars(str(tmp_path), "loss") == {1: 2.5}
