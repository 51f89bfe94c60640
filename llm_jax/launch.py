"""What every entry point shares at start-up: flag parsing with one-line errors, quiet library logs, and the
multi-controller flags for the entry points that start several processes."""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from typing import Callable
from typing import NoReturn

import jax
from absl import flags
from absl import logging

from llm_jax import errors
from llm_jax import faults

# Errors a user can fix (llm_jax.errors): shown as one line, never as a traceback. Any other exception is a bug of
# ours or of a library and keeps its traceback.
USER_ERRORS = (errors.UserError,)


class DistributedFlags:
  """The multi-controller flags, defined only by the entry points that start (or hand on) a multi-process run."""

  def __init__(self, flag_values: flags.FlagValues = flags.FLAGS):
    env = os.environ
    self._coordinator = flags.DEFINE_string(
        "coordinator_address", env.get("LLM_JAX_COORDINATOR_ADDRESS"),
        "host:port of process 0 for a multi-process run (env LLM_JAX_COORDINATOR_ADDRESS).", flag_values=flag_values)
    self._num_processes = flags.DEFINE_integer(
        "num_processes", int(env.get("LLM_JAX_NUM_PROCESSES", "0")) or None,
        "Processes in a multi-process run (env LLM_JAX_NUM_PROCESSES).", flag_values=flag_values)
    self._process_id = flags.DEFINE_integer(
        "process_id", int(env["LLM_JAX_PROCESS_ID"]) if "LLM_JAX_PROCESS_ID" in env else None,
        "This process's index in a multi-process run (env LLM_JAX_PROCESS_ID).", flag_values=flag_values)
    self._distributed = flags.DEFINE_bool(
        "distributed", False, "Call jax.distributed.initialize() with auto-detection (Cloud TPU VMs, "
        "SLURM, ...) of whatever --coordinator_address, --num_processes and --process_id leave unset; implied by "
        "--coordinator_address.", flag_values=flag_values)
    self._peer_timeout = flags.DEFINE_float(
        "peer_timeout_s", 60.0, "Seconds without a heartbeat from another process before this one stops, "
        "naming it (multi-process runs only).", flag_values=flag_values)
    self._flag_values = flag_values
    self._watchdog: faults.PeerWatchdog | None = None

  def _multi_process(self) -> bool:
    return bool(self._coordinator.value) or self._distributed.value

  def check(self, ignored_by: str | None = None) -> None:
    """Raises ValueError for a multi-controller setting that would be ignored: any of them given on the command
    line when `ignored_by` (a mode that starts no process) is set, or one that only a multi-process run reads."""
    names = ("coordinator_address", "num_processes", "process_id", "distributed", "peer_timeout_s")
    given = [f"--{name}" for name in names if self._flag_values[name].present]
    if ignored_by and given:
      raise errors.ConfigError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} ignored by {ignored_by}, "
                               f"which starts no process; drop {'it' if len(given) == 1 else 'them'}")
    if self._multi_process():
      if self._peer_timeout.value <= 2 * faults.PeerWatchdog.INTERVAL_S:
        raise errors.ConfigError(f"--peer_timeout_s={self._peer_timeout.value:g} is not longer than two heartbeats "
                                 f"({faults.PeerWatchdog.INTERVAL_S:g} s apart), so a busy peer would be taken for a "
                                 f"lost one; pass more than {2 * faults.PeerWatchdog.INTERVAL_S:g}")
      return
    for name, env_name, value in (("num_processes", "LLM_JAX_NUM_PROCESSES", self._num_processes.value),
                                  ("process_id", "LLM_JAX_PROCESS_ID", self._process_id.value)):
      if value is not None:
        source = f"--{name}" if self._flag_values[name].present else f"{env_name}={value} (environment)"
        raise errors.ConfigError(f"{source} is set but no multi-process run is asked for; add "
                                 "--coordinator_address=host:port (or --distributed to detect the rest), or drop it")
    if self._flag_values["peer_timeout_s"].present:
      raise errors.ConfigError("--peer_timeout_s is read only by a multi-process run; add "
                               "--coordinator_address=host:port (or --distributed), or drop it")

  def initialize(self, program: str) -> None:
    """Joins the multi-controller runtime when asked to; a single process needs nothing. Errors are one line."""
    try:
      self.check()
    except ValueError as e:
      fail(program, e)
    if not self._multi_process():
      return
    try:  # jax.distributed auto-detects (TPU VM, SLURM, ...) only the values left as None
      jax.distributed.initialize(coordinator_address=self._coordinator.value or None,
                                 num_processes=self._num_processes.value, process_id=self._process_id.value)
    except (ValueError, TypeError) as e:
      fail(program, ValueError(f"multi-process start-up: {' '.join(str(e).split())} Pass --coordinator_address, "
                               "--num_processes and --process_id (or LLM_JAX_COORDINATOR_ADDRESS, ...) on a host "
                               "that jax cannot detect them on"))
    self._watchdog = faults.PeerWatchdog(timeout_s=self._peer_timeout.value)
    self._watchdog.start()

  def run(self, program: str, body: Callable[[], None]) -> None:
    """`run_main` for an entry point that called `initialize`: in a multi-process run, tells the other processes
    how this one ended, so that one finishing early is not taken for lost and one failing is named at once."""
    try:
      run_main(program, body)
    except BaseException as e:
      if self._watchdog is not None:
        code = e.code if isinstance(e, SystemExit) else 1
        if code in (None, 0):  # sys.exit() and sys.exit(0) end a run normally
          self._watchdog.finish()
        else:
          self._watchdog.fail(code if isinstance(code, int) else 1)
      raise
    if self._watchdog is not None:
      self._watchdog.finish()

  def args(self) -> tuple[str, ...]:
    """This process's multi-controller flags, to hand on to child training processes."""
    if not self._multi_process():
      return ()
    given = [("coordinator_address", self._coordinator.value), ("num_processes", self._num_processes.value),
             ("process_id", self._process_id.value)]
    set_ = tuple(f"--{name}={value}" for name, value in given if value not in (None, ""))
    return (*set_, *(() if self._coordinator.value else ("--distributed",)),
            f"--peer_timeout_s={self._peer_timeout.value}")


def quiet_logs() -> None:
  """Library INFO and WARNING logs (orbax, tfds) stay off unless --verbosity asks; ours are printed."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)


def _config_error_line(error: BaseException, argv: list[str]) -> str:
  """One line for errors ml_collections raises while loading a config file or applying overrides."""
  text = " ".join(str(error).split())
  if isinstance(error, (AttributeError, KeyError)):
    # ConfigDict raises AttributeError(KeyError(message)), and str() of a KeyError is the repr of its message: read
    # the message itself, or a "Did you mean" suggestion arrives as a literal '\\n' between quotes.
    message = error
    while isinstance(message, BaseException) and len(message.args) == 1:
      message = message.args[0]
    text = " ".join(str(message).split())
    key = text.split()[0].strip("\"'") if text else ""
    culprit = next((a for a in argv if a.startswith("--config.") and key in a.split("=")[0]), key)
    close = re.search(r'Did you mean "([^"]+)"', text)
    hint = ""
    if close and culprit.startswith("--config."):
      parent = culprit.split("=")[0][len("--config."):].rpartition(".")[0]
      hint = f" (did you mean {parent + '.' if parent else ''}{close.group(1)}?)"
    return f"unknown config key in {culprit}{hint}; check its spelling against llm_jax/config.py"
  if "No such file or directory" in text:
    path = text.split("No such file or directory:")[-1].strip(" '\"")
    return f"config file {path} does not exist; pass an existing file, e.g. --config=experiments/smoke.py"
  for marker in ("ValueError: ", "ConfigError: "):
    if marker in text:
      return text.split(marker, 1)[1]
  return text


def _values_of(name: str, argv: list[str]) -> list[str]:
  """The values of every `--name=V`, `--name V`, `-name=V` or `-name V` in argv (before a bare `--`)."""
  values = []
  args = argv[1:]
  for i, arg in enumerate(args):
    if arg == "--":
      break
    flag, eq, value = arg.lstrip("-").partition("=")
    if not arg.startswith("-") or flag != name:
      continue
    if eq:
      values.append(value)
    elif i + 1 < len(args):
      values.append(args[i + 1])
  return values


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors (unknown flag or config key, wrong type, missing file) are one line."""
  program = "llm_jax." + os.path.splitext(os.path.basename(argv[0]))[0]
  if "config" in flags.FLAGS:
    given = _values_of("config", argv)
    if len(given) > 1:  # absl would silently keep the last one
      fail(program, ValueError(f"--config is given {len(given)} times ({', '.join(given)}); pass it once, and "
                               "change single keys with --config.<key>=<value>"))
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
      flags.FLAGS["config"].value.keys()  # a config file that failed to load raises only when first used
    return rest
  except flags.Error as e:
    cause = e.__cause__
    message = _config_error_line(cause, argv) if cause is not None and not isinstance(cause, flags.Error) else (
        _config_error_line(e, argv))
    fail(program, ValueError(message))
  except Exception as e:  # pylint: disable=broad-except  # config files can raise anything while loading
    fail(program, ValueError(_config_error_line(e, argv)))


def fail(program: str, error: BaseException, exit_code: int = 2) -> NoReturn:
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  print(f"{program}: error: {first_line}", file=sys.stderr, flush=True)
  sys.exit(exit_code)


def run_main(program: str, body: Callable[[], None]) -> None:
  """Runs `body`, turning user errors into one line on stderr and exit status 2."""
  quiet_logs()
  try:
    body()
  except faults.Interrupted as e:
    fail(program, e, exit_code=e.exit_code)
  except USER_ERRORS as e:
    fail(program, e)
  except Exception as e:  # pylint: disable=broad-except  # storage errors arrive wrapped by orbax, tfds, ...
    line = storage_error_line(e) or lost_peer_line(e)
    if line is None:
      raise
    fail(program, ValueError(line))


# Storage conditions a user fixes outside the program: one line naming the path, not a traceback.
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


def lost_peer_line(error: BaseException) -> str | None:
  """One line for a collective that failed because another process went away, or None: Gloo's (CPU) closed
  connection, or NCCL's (GPU) ncclRemoteError, which cannot tell a peer that exited from a network failure. The peer
  watchdog names the process when it notices first; a collective that sees the closed connection first says this."""
  text = " ".join(str(error).split())
  if not isinstance(error, jax.errors.JaxRuntimeError):
    return None
  if "Gloo" in text and any(sign in text for sign in ("reset by peer", "closed by peer", "Broken pipe",
                                                      "Connection refused")):
    cause = "another process went away"
  elif "NCCL" in text and "remote process exited or there was a network error" in text:
    cause = "another process exited or the network between hosts failed"
  else:
    return None
  return (f"a collective failed because {cause} ({text[:160]}); see the other processes' logs. "
          "Completed checkpoints are kept: restart every process with the same command to resume")


def storage_error_line(error: BaseException) -> str | None:
  """'no space left writing PATH (N MB free on that file system)...' if `error` (or its cause) is one."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
      path = error.filename or "the workdir"
      where = os.path.abspath(str(path)) if error.filename else os.getcwd()
      while where and not os.path.exists(where):
        where = os.path.dirname(where)
      free = shutil.disk_usage(where).free / 1e6 if where else float("nan")
      return (f"{_STORAGE_ERRNOS[error.errno]} writing {path} ({free:,.0f} MB free on that file system); "
              "free space or fix permissions, then rerun the same command: completed checkpoints are kept")
    error = error.__cause__ or error.__context__
  return None
