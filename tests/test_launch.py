"""launch: multi-controller settings that would be ignored are refused, what is handed on, the lost-peer line."""

import jax
import pytest
from absl import flags
from conftest import assert_cli_error
from conftest import assert_one_line
from conftest import raises_one_line

from llm_jax import errors
from llm_jax import faults
from llm_jax import launch


def _flags(argv: list[str], monkeypatch=None, **env: str) -> launch.DistributedFlags:
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  values = flags.FlagValues()
  distributed = launch.DistributedFlags(flag_values=values)
  values(["prog", *argv])
  return distributed


@pytest.mark.parametrize("argv, fragments", [
    (["--num_processes=2"], ("--num_processes", "--coordinator_address")),
    (["--process_id=1"], ("--process_id", "--coordinator_address")),
    (["--peer_timeout_s=30"], ("--peer_timeout_s", "--coordinator_address")),
    (["--distributed", "--peer_timeout_s=3"],
     ("--peer_timeout_s=3", f"more than {2 * faults.PeerWatchdog.INTERVAL_S:g}")),  # the computed minimum
])
def test_settings_a_single_process_ignores_are_refused(argv, fragments):
  with raises_one_line(errors.ConfigError, *fragments) as error:
    _flags(argv).check()
  assert str(error.value).startswith(fragments[0])  # the flag that was given comes first, not one it suggests


def test_a_process_count_from_the_environment_is_named_as_such(monkeypatch):
  with raises_one_line(errors.ConfigError, "LLM_JAX_NUM_PROCESSES=4", "environment") as error:
    _flags([], monkeypatch, LLM_JAX_NUM_PROCESSES="4").check()
  assert "--num_processes" not in str(error.value)  # it was not given on the command line


def test_a_mode_that_starts_no_process_refuses_every_given_flag():
  with raises_one_line(errors.ConfigError, "--distributed, --peer_timeout_s", "--report"):
    _flags(["--distributed", "--peer_timeout_s=30"]).check(ignored_by="--report")
  _flags([]).check(ignored_by="--report")  # nothing given: nothing to refuse


def test_valid_settings_pass_and_are_handed_on_whole():
  single = _flags([])
  single.check()
  assert single.args() == ()
  explicit = _flags(["--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=1",
                     "--peer_timeout_s=10"])
  explicit.check()
  assert explicit.args() == ("--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=1",
                             "--peer_timeout_s=10.0")
  # With --distributed, given values are passed on and the rest is left to jax's cluster detection.
  detected = _flags(["--distributed", "--num_processes=4"])
  detected.check()
  assert detected.args() == ("--num_processes=4", "--distributed", "--peer_timeout_s=60.0")


@pytest.mark.slow
def test_sweep_report_refuses_distributed_flags_in_one_line(cli, tmp_path):
  out = cli("llm_jax.sweep", "--report", f"--root={tmp_path}", "--num_processes=2")
  line = assert_cli_error(out, "sweep", "--num_processes", "--report")
  assert "--peer_timeout_s" not in line  # only the flag that was given
  several = _flags(["--distributed", "--peer_timeout_s=30"])
  with raises_one_line(errors.ConfigError, "--distributed, --peer_timeout_s", "--report"):
    several.check(ignored_by="--report")


@pytest.mark.slow
def test_train_names_a_start_up_the_runtime_cannot_complete(cli, tmp_path):
  # No coordinator on the command line and none that jax can detect on this host.
  out = cli("llm_jax.train", "--config=experiments/smoke.py", f"--workdir={tmp_path / 'w'}", "--distributed")
  assert_cli_error(out, "train", "multi-process start-up", "coordinator_address")
  assert not (tmp_path / "w").exists()


def test_a_collective_that_lost_its_peer_is_one_line_and_others_are_not():
  # Recorded from a CI run whose peer was SIGKILLed while the survivor was in an all-reduce.
  lost = jax.errors.JaxRuntimeError("UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:538] "
                                    "Read error [127.0.0.1]:13716: Connection reset by peer")
  line = launch.lost_peer_line(lost)
  assert_one_line(line, "another process went away", "(UNKNOWN: Gloo all-reduce", "restart every process")
  assert launch.lost_peer_line(jax.errors.JaxRuntimeError("UNKNOWN: Gloo all-reduce failed: bad size")) is None
  assert launch.lost_peer_line(RuntimeError("Gloo: Connection reset by peer")) is None  # not from the runtime
  # NCCL's text for ncclRemoteError (ncclGetErrorString), as XLA:GPU wraps it.
  nccl = jax.errors.JaxRuntimeError("INTERNAL: NCCL operation ncclGroupEnd() failed: remote process exited or there "
                                    "was a network error. Last NCCL warning(error) log entry (may be unrelated) "
                                    "'Net : Connection closed by remote peer'.")
  assert_one_line(launch.lost_peer_line(nccl), "another process exited or the network", "(INTERNAL: NCCL operation "
                  "ncclGroupEnd()")
  assert launch.lost_peer_line(jax.errors.JaxRuntimeError("INTERNAL: NCCL operation ncclCommInitRank failed: "
                                                          "unhandled cuda error")) is None  # a local failure


class _Recorder:
  """Stands in for the peer watchdog: records how `DistributedFlags.run` said this process ended."""

  def __init__(self):
    self.ended = []

  def finish(self) -> None:
    self.ended.append("finished")

  def fail(self, exit_code: int) -> None:
    self.ended.append(("failed", exit_code))


def _raise(error: BaseException):
  def body() -> None:
    raise error
  return body


@pytest.mark.parametrize("body, ended, exit_code", [
    (lambda: None, "finished", "returns"),
    (_raise(SystemExit()), "finished", None),  # sys.exit(): a normal end, not a failure with status 1
    (_raise(SystemExit(0)), "finished", 0),
    (_raise(SystemExit(3)), ("failed", 3), 3),
    (_raise(errors.ConfigError("bad flag")), ("failed", 2), 2),  # a user error: run_main's one line and status 2
    (_raise(RuntimeError("a bug")), ("failed", 1), "traceback"),  # the interpreter's status 1
    (_raise(ValueError("a bug")), ("failed", 1), "traceback"),  # not a UserError: a bug, whatever its builtin kind
])
def test_run_tells_the_peers_how_this_process_ended(body, ended, exit_code):
  distributed, recorder = _flags([]), _Recorder()
  distributed._watchdog = recorder  # pylint: disable=protected-access
  if exit_code == "returns":
    distributed.run("prog", body)
  elif exit_code == "traceback":
    with pytest.raises((RuntimeError, ValueError), match="a bug"):
      distributed.run("prog", body)
  else:
    with pytest.raises(SystemExit) as caught:
      distributed.run("prog", body)
    assert caught.value.code == exit_code
  assert recorder.ended == [ended]
