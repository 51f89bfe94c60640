"""Multi-process training on localhost, per-process data slices, the dry run and mesh refusals via the CLI."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import assert_cli_error
from conftest import free_port

from llm_jax import writers

SMOKE = "--config=experiments/smoke.py"


def _spawn(process_id: int, port: int, workdir: str, repo: str, steps: int = 20, *extra: str) -> subprocess.Popen:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  args = [sys.executable, "-m", "llm_jax.train", SMOKE, f"--workdir={workdir}", f"--config.num_train_steps={steps}",
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={process_id}", *extra]
  return subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_reach_the_losses_of_one(tmp_path, smoke_20):
  from conftest import REPO  # pylint: disable=import-outside-toplevel
  single = smoke_20
  multi = str(tmp_path / "multi")
  port = free_port()
  procs = [_spawn(i, port, multi, REPO) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  # Only process 0 prints and writes metrics.
  assert "step     20/20" in outputs[0] and "step     20/20" not in outputs[1]
  one = [(r["step"], r["loss"]) for r in writers.read_metrics(single) if "loss" in r]
  two = [(r["step"], r["loss"]) for r in writers.read_metrics(multi) if "loss" in r]
  assert [s for s, _ in two] == [s for s, _ in one]
  np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=1e-5)
  val_one = [r["val_loss"] for r in writers.read_metrics(single) if "val_loss" in r]
  val_two = [r["val_loss"] for r in writers.read_metrics(multi) if "val_loss" in r]
  np.testing.assert_allclose(val_two, val_one, rtol=1e-5)


@pytest.mark.slow
def test_dry_run_prints_memory_and_flops_without_training(cli, tmp_path):
  workdir = tmp_path / "dry"
  # 512 rows over data x fsdp = 4 devices: 128 rows of 64 tokens each, which the CPU default splits into 2
  # micro-batches of 4,096 tokens (steps.AUTO_MICRO_BATCH_TOKENS).
  result = cli("llm_jax.train", SMOKE, f"--workdir={workdir}", "--config.dry_run=True",
               "--config.mesh.fsdp=4", "--config.mesh.tensor=2", "--config.global_batch_size=512")
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout
  for fragment in ("dry run on 8 x cpu, 2 micro-batches per update", "parameters", "optimizer state", "temporaries",
                   "FLOPs per step", "replicated share  0.0%", "P(None, 'fsdp', 'tensor', None)"):
    assert fragment in out, fragment
  assert not (workdir / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("flags, fragments", [
    (("--config.mesh.data=3",), ("mesh.data=3", "needs 3 devices but 8 are present")),
    (("--config.mesh.fsdp=3",), ("mesh.fsdp=3", "does not divide the 8 devices")),
    (("--config.mesh.tensor=8", "--config.model.num_heads=2", "--config.model.head_dim=32"),
     ("does not divide over mesh axes ('tensor',)", "mesh.tensor")),
    (("--config.global_batch_size=12",), ("global_batch_size=12", "does not divide over data x fsdp = 8 devices")),
])
def test_impossible_mesh_fails_before_compiling_with_the_fix(cli, tmp_path, flags, fragments):
  result = cli("llm_jax.train", SMOKE, f"--workdir={tmp_path}", "--config.dry_run=True", *flags)
  assert_cli_error(result, "train", *fragments)


@pytest.mark.slow
def test_replicated_parameters_past_the_tolerance_are_refused(cli, tmp_path):
  result = cli("llm_jax.train", SMOKE, f"--workdir={tmp_path}", "--config.dry_run=True", "--config.mesh.fsdp=8",
               "--config.max_replicated_share=0.0")
  assert_cli_error(result, "train", "would be fully replicated", "max_replicated_share")


@pytest.mark.slow
def test_a_killed_peer_is_named_by_the_survivor(tmp_path):
  from conftest import REPO  # pylint: disable=import-outside-toplevel
  port = free_port()
  workdir = str(tmp_path / "multi")
  procs = [_spawn(i, port, workdir, REPO, 100_000, "--peer_timeout_s=10") for i in range(2)]
  # Kill process 1 once both are training (process 0 has written its first checkpoint).
  deadline = time.time() + 300
  while not os.path.isdir(os.path.join(workdir, "checkpoints", "10")) and time.time() < deadline:
    assert procs[0].poll() is None, procs[0].stdout.read()[-3000:]
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGKILL)
  procs[1].wait()
  started = time.time()
  out = procs[0].communicate(timeout=240)[0]
  assert procs[0].returncode == 2, out[-3000:]
  # The watchdog names process 1 unless a collective saw the closed connection first (under load, in CI).
  assert "process 1 has sent no heartbeat for" in out or "because another process went away" in out, out[-3000:]
  assert "restart every process" in out, out[-3000:]
  assert time.time() - started < 60  # the 10 s watchdog, well before the runtime's own 100 s heartbeat timeout


_WATCHED_EXIT = """
import sys, time, jax
from llm_jax import faults
process_id, port, ending = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address="127.0.0.1:" + port, num_processes=2, process_id=process_id)
watchdog = faults.PeerWatchdog(timeout_s=1.0, interval_s=0.002)
watchdog.start()
if process_id == 0:
  time.sleep(3.0 if ending == "finish" else 60.0)  # three peer timeouts, or blocked (as in a collective on 1)
  print("exiting 0", flush=True)
elif ending == "finish":
  watchdog.finish()  # done at once: it waits, silent, at jax's exit barrier while process 0 works on
  print("exiting 1", flush=True)
else:
  print("process 1 fails", flush=True)
  watchdog.fail(3)
  sys.exit(3)
"""


def _watched_exit(tmp_path, ending: str) -> tuple[list[int], list[str], float]:
  from conftest import REPO  # pylint: disable=import-outside-toplevel
  port = str(free_port())
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  started = time.time()
  procs = [subprocess.Popen([sys.executable, "-c", _WATCHED_EXIT, str(p), port, ending], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in range(2)]
  outputs = [p.communicate(timeout=120)[0] for p in procs]
  return [p.returncode for p in procs], outputs, time.time() - started


@pytest.mark.slow
def test_peers_that_finish_at_different_times_exit_cleanly(tmp_path):
  # A process that finished is not taken for lost while it waits for the others, and a heartbeat racing jax's
  # shutdown of the runtime at exit is not taken for the loss of process 0 (a 2 ms heartbeat hits that window).
  codes, outputs, _ = _watched_exit(tmp_path, "finish")
  assert codes == [0, 0], outputs
  assert all(f"exiting {p}" in out and "error" not in out for p, out in enumerate(outputs)), outputs


@pytest.mark.slow
def test_a_failed_peer_is_named_at_once_and_leaves_with_its_status(tmp_path):
  # Process 0 is blocked (as in a collective on process 1) for 60 s: it is told at once, not after a timeout, and
  # process 1 does not wait for it at jax's exit barrier (which would end in the runtime's abort).
  codes, outputs, seconds = _watched_exit(tmp_path, "fail")
  assert codes == [2, 3], outputs
  assert "process 1 stopped on an error (see its log); stopping process 0 too" in outputs[0], outputs
  assert "exiting 0" not in outputs[0] and seconds < 40, (seconds, outputs)
