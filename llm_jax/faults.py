"""What stops or shields a run: `RunError`, the workdir lock, SIGTERM/SIGINT turned into a clean stop, the watchdog
that names a lost peer of a multi-process run, and the refusal to start a run inside a worker process that is
re-importing the user's script."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import signal
import sys
import threading
import time
from typing import Any
from typing import Iterator

import jax
from jax.experimental import multihost_utils

from llm_jax import errors
from llm_jax import paths


class Interrupted(errors.RunError):
  """SIGTERM or SIGINT before there was anything to checkpoint; `exit_code` is the shell's 128 + signal."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


def check_not_importing_main(what: str) -> None:
  """Refuses `what` in a spawned worker that is re-running the parent's script (as module __mp_main__).

  The data store's workers are spawned; a script that calls the trainer (or prepare_data) at its top level,
  unguarded, would start a second run in each worker, which then waits forever for the parent's locks. Raised
  here, the worker dies at once and the parent's pool reports it.
  """
  # While a spawned worker re-runs the script, runpy holds it as sys.modules['__mp_main__'] and '__main__' is still
  # the worker's own; once the worker is up both name one module.
  importing = sys.modules.get("__mp_main__")
  if importing is not None and importing is not sys.modules.get("__main__"):
    raise errors.RunError(f"{what} was called while a worker process imported your script: put the call under `if "
                          "__name__ == '__main__':`")


@contextlib.contextmanager
def interruptible(what: str) -> Iterator[None]:
  """Turns SIGTERM/SIGINT during `what` into an `Interrupted` error that says so, instead of a silent exit 143
  or a KeyboardInterrupt traceback. Everything written before it is kept: each file is written atomically."""

  def handle(signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
    raise Interrupted(f"{signal.Signals(signum).name} while {what}, before the first checkpoint of this "
                      "invocation; files already written are complete and reused, so rerun the same command "
                      "to continue", signum)

  if jax.process_count() > 1:  # JAX's preemption notifier owns SIGTERM in multi-process runs
    yield
    return
  previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


class WorkdirLock:
  """An exclusive flock on the lock file `path` in a workdir (`workdir.lock_path`); the OS releases it when the
  process dies, even by SIGKILL.

  An object store (a gs:// workdir) has no flock, and a lock file there could not be both exclusive and freed
  when its holder is killed (preemption would leave it behind and block the restart). So there is no lock:
  `acquire` prints one warning, and one job per workdir is the user's job (two would interleave checkpoints
  and metrics).
  """

  def __init__(self, path: str):
    self.path = path
    self._fd: int | None = None

  def acquire(self) -> None:
    if jax.process_index() != 0:
      return  # one lock per run: process 0 holds it for all
    if not paths.is_local(self.path):
      paths.warn_no_lock(os.path.dirname(self.path), "the workdir")
      return
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise errors.RunError(f"workdir {os.path.dirname(self.path)} is in use by a running job (pid "
                            f"{holder}); wait for it to finish or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


class Preemption:
  """Turns SIGTERM (how a Cloud TPU VM announces preemption) and SIGINT (Ctrl-C) into a checkpoint of the current
  step and an exit, before any logging or evaluation that step was due (the loop saves those for the resumed run);
  further signals are absorbed until `uninstall`, after that checkpoint has committed.

  With several processes JAX's own preemption notifier catches SIGTERM and
  `reached_preemption_sync_point` makes every process agree on the same step.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.reason = ""
    self._previous: dict[int, Any] = {}

  def install(self) -> None:
    if jax.process_count() == 1:
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def _handle(self, signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
    if not self.requested:
      name = signal.Signals(signum).name
      self.reason = "preempted (SIGTERM)" if signum == signal.SIGTERM else f"interrupted ({name})"
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      if multihost_utils.reached_preemption_sync_point(step):
        self.reason = "preempted (SIGTERM)"
        return True
      return False
    return self.requested

  def signalled(self) -> bool:
    """Whether a signal arrived, at any moment (one process: lets a long evaluation stop for it); a multi-process
    run learns of a preemption only at `should_stop`'s sync point, where every process agrees on the step."""
    return self.requested

  def uninstall(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


class PeerWatchdog:
  """In a multi-process run, notices a peer that stopped (killed, crashed, hung, or failed) and ends this process
  with a line naming it, instead of blocking in a collective until a runtime timeout aborts it with no word.

  Each process bumps a counter in the runtime's key-value store every `interval_s`; a peer whose counter has
  not moved for `timeout_s` (measured on this host's monotonic clock, so host clocks need not agree) is gone.
  A process that ends marks its counter: `finished` (its peers stop watching it, and it waits for them at jax's
  exit barrier) or, after `fail`, `failed` (its peers stop at once, naming it, and it leaves without waiting: the
  peers are blocked in a collective on it and would never reach that barrier).
  """

  INTERVAL_S = 2.0  # seconds between heartbeats
  FINISHED, FAILED = "finished", "failed"  # the last value of the counter of a process that ended

  def __init__(self, timeout_s: float = 60.0, interval_s: float = INTERVAL_S):
    self.interval_s, self.timeout_s = interval_s, timeout_s
    self._me, self._client, self._thread, self._exit_code = 0, None, None, None
    self._lock, self._ended, self._exiting, self._closed = (threading.Lock(), threading.Event(), threading.Event(),
                                                            threading.Event())

  def start(self) -> None:
    from jax._src import distributed  # pylint: disable=import-outside-toplevel  # no public API exposes the store
    state = distributed.global_state
    if state.client is None or not state.num_processes or state.num_processes == 1:
      return
    # The ids come from the runtime's own record: asking jax.process_index() here would initialise the
    # backends from this thread while the main thread does the same.
    self._me, self._client = state.process_id, state.client
    self._thread = threading.Thread(target=self._watch, args=(state.num_processes,), name="llm_jax-peer-watchdog",
                                    daemon=True)
    self._thread.start()
    atexit.register(self._at_exit)  # atexit runs the last registered first: this before jax's own exit handler

  def finish(self) -> None:
    """Marks this process's work as completed: its peers stop watching it while it waits for them at exit."""
    self._end(self.FINISHED)

  def fail(self, exit_code: int) -> None:
    """Marks this process as stopped on an error (already reported): its peers stop at once, naming it, and at exit
    it leaves with `exit_code` without waiting for them."""
    self._exit_code = exit_code
    self._end(self.FAILED)

  def _end(self, mark: str) -> None:
    with self._lock:  # the heartbeat takes it too, so that no beat overwrites the mark
      if self._client is None or self._ended.is_set():
        return
      self._ended.set()
      try:
        self._client.key_value_set(self._key(self._me), mark, allow_overwrite=True)
      except Exception:  # pylint: disable=broad-except  # the peers then see a silent process, and name it later
        pass

  def _at_exit(self) -> None:
    """A failed process leaves now; any other waits, watched, at jax's exit barrier for every process, then ends
    the thread while the interpreter can still run it (a daemon thread that returns from a runtime call after
    the interpreter began finalising aborts the process)."""
    if self._exit_code is not None:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(self._exit_code)  # pylint: disable=protected-access
    self.finish()  # a program that simply ended (one that joined the runtime without run())
    self._exiting.set()
    jax.distributed.shutdown()  # waits for every process (a lost one is named meanwhile), then closes the client
    self._closed.set()
    self._thread.join(timeout=self.interval_s + 10.0)

  @staticmethod
  def _key(process: int) -> str:
    return f"llm_jax/heartbeat/{process}"

  def _watch(self, num_processes: int) -> None:
    me, beats, client = self._me, 0, self._client
    seen = {p: ("", time.monotonic()) for p in range(num_processes) if p != me}
    while not self._closed.is_set():
      try:
        with self._lock:
          if not self._ended.is_set():
            beats += 1
            client.key_value_set(self._key(me), str(beats), allow_overwrite=True)
        values = {p: self._try_get(client, self._key(p)) for p in seen}
      except Exception as e:  # pylint: disable=broad-except  # the store lives in process 0
        if self._exiting.is_set():
          return  # jax closed the runtime at exit, every process having arrived: nothing was lost
        self._stop(f"lost contact with process 0, which runs the coordinator ({' '.join(str(e).split())[:120]}); "
                   "it was probably killed: see its log")
      now = time.monotonic()
      for peer, value in values.items():
        if value == self.FINISHED:
          del seen[peer]  # it completed its work and waits for this one at exit
        elif value == self.FAILED:
          if self._exit_code is None:  # one that failed itself leaves with its own status at exit
            self._stop(f"process {peer} stopped on an error (see its log)")
          del seen[peer]
        elif value != seen[peer][0]:
          seen[peer] = (value, now)
        elif now - seen[peer][1] > self.timeout_s:  # also while this process waits for it at exit
          self._stop(f"process {peer} has sent no heartbeat for {now - seen[peer][1]:.0f} s: it was killed or "
                     "hangs (see its log)")
      self._closed.wait(self.interval_s)

  @staticmethod
  def _try_get(client: Any, key: str) -> str:
    try:
      return client.key_value_try_get(key)
    except Exception as e:  # pylint: disable=broad-except  # the runtime raises a generic error for a missing key
      if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
        return ""  # the peer has not beaten yet
      raise

  def _stop(self, reason: str) -> None:
    print(f"llm_jax: error: {reason}; stopping process {self._me} too. Completed checkpoints are "
          "kept: restart every process with the same command to resume", file=sys.stderr, flush=True)
    os._exit(2)  # pylint: disable=protected-access  # the main thread may be blocked inside a collective

