"""Process pools for CPU-bound data work whose workers die with their parent: a killed or interrupted preparation
leaves no worker (nor the resource tracker waiting on one) behind."""

import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def spawn_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
  """`workers` spawned processes, each killed by the kernel when this process dies (Linux).

  Spawned, not forked: the parent may hold JAX and grain threads. An executor, not multiprocessing.Pool: a worker
  that dies (the out-of-memory killer, a script without a __main__ guard) breaks it with an error, where a Pool
  would wait for that worker's result forever.
  """
  return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_die_with_parent, initargs=(os.getpid(),))


def stop_pool(pool: concurrent.futures.ProcessPoolExecutor) -> None:
  """Stops the workers now: `shutdown` (and the interpreter's exit) would wait for their running jobs. The executor
  has no public way to stop its processes."""
  for process in list((pool._processes or {}).values()):  # pylint: disable=protected-access
    process.terminate()
  pool.shutdown(wait=False, cancel_futures=True)


def _die_with_parent(parent_pid: int) -> None:
  """A worker's initializer: on Linux the kernel kills it when its parent dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != parent_pid:  # the parent died before the line above took effect
    os._exit(1)  # pylint: disable=protected-access
