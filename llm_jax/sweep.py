"""`python -m llm_jax.sweep --sweep=experiments/<sweep>.py --root=DIR [--list]`, or `--report --root=DIR`.

Runs every point of a sweep (format: `llm_jax/sweeps/plan.py`) one after another, each in its own workdir
under --root; rerunning skips finished runs and resumes the others. `--report` writes results.csv,
runs.csv, results.md and PNG plots into --root (`llm_jax/sweeps/report.py`).
"""

from __future__ import annotations

import os
import shlex
from typing import Sequence

from absl import app
from absl import flags

from llm_jax import errors
from llm_jax import launch
from llm_jax import paths
from llm_jax.sweeps import plan
from llm_jax.sweeps import report

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file (format: llm_jax/sweeps/plan.py); optional with --report.")
_ROOT = flags.DEFINE_string("root", None, "Directory holding one workdir per run.")
_LIST = flags.DEFINE_bool("list", False, "List the runs, their status and exact commands; run nothing.")
_REPORT = flags.DEFINE_bool("report", False, "Collect finished runs into results.csv, results.md and PNG plots.")
flags.mark_flag_as_required("root")
_DISTRIBUTED = launch.DistributedFlags()


def _report() -> None:
  if not os.path.isdir(_ROOT.value):
    raise errors.MissingFileError(f"--root={_ROOT.value} does not exist; pass the --root the sweep ran in")
  sweep = plan.load_sweep(_SWEEP.value) if _SWEEP.value else plan.read_manifest(_ROOT.value)
  result = report.write_report(sweep, _ROOT.value)
  print(result.table, end="")
  if result.missing:
    print(f"not finished yet (left out): {', '.join(result.missing)}")
  print("wrote " + ", ".join(result.files))


def _sweep() -> None:
  if not _SWEEP.value:
    raise errors.ConfigError("--sweep is missing; pass --sweep=experiments/<sweep>.py (or --report to summarise a "
                             "root)")
  sweep = plan.load_sweep(_SWEEP.value)
  extra = _DISTRIBUTED.args()
  runs = plan.expand(sweep, _ROOT.value, extra)
  if _LIST.value:
    for run in runs:
      stale = plan.stale_settings(run)
      note = f"; recorded with other settings: {sorted(stale)}" if stale else ""
      print(f"# {run.name} [{plan.status(run)}{note}]\n{shlex.join(run.command)}")
    print(f"# {len(runs)} runs, {sum(plan.status(r) == 'finished' for r in runs)} finished")
    return
  plan.check_not_stale(runs)
  plan.write_manifest(sweep, runs, _ROOT.value)
  try:
    outcome = plan.run_all(runs, skip_finished=not extra)
  except KeyboardInterrupt:
    launch.fail("llm_jax.sweep", RuntimeError("interrupted; rerun the same command to resume"))
  failed = [name for name, result in outcome.items() if result.startswith("failed")]
  if failed:
    raise errors.RunError(f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed)}); see their train.log, then "
                          "rerun the same command to retry them")
  print(f"all {len(runs)} runs finished; summarise them with: python -m llm_jax.sweep --report "
        f"--root={shlex.quote(_ROOT.value)}")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    paths.check_local(_ROOT.value, "--root")
  except ValueError as e:
    launch.fail("llm_jax.sweep", e)
  if not _ROOT.value.strip():
    launch.fail("llm_jax.sweep", ValueError("--root is empty; pass the directory that holds the runs"))
  if os.path.isfile(_ROOT.value):
    launch.fail("llm_jax.sweep", ValueError(f"--root={_ROOT.value} is a file; pass the directory that holds (or will "
                                            "hold) one workdir per run"))
  if _REPORT.value and _LIST.value:
    launch.fail("llm_jax.sweep", ValueError("--list and --report exclude each other; pass one of them"))
  try:
    _DISTRIBUTED.check(ignored_by="--report" if _REPORT.value else None)
  except ValueError as e:
    launch.fail("llm_jax.sweep", e)
  launch.run_main("llm_jax.sweep", _report if _REPORT.value else _sweep)


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
