"""`python -m llm_jax.sweep --sweep=experiments/<sweep>.py --root=DIR [--dry_run | --report]`."""

from __future__ import annotations

import shlex
from typing import Sequence

from absl import app
from absl import flags

from llm_jax import launch
from llm_jax import report
from llm_jax import sweeps

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file (see llm_jax/sweeps.py for its format).")
_ROOT = flags.DEFINE_string("root", None, "Directory holding one workdir per run.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the runs, their status and exact commands; run nothing.")
_REPORT = flags.DEFINE_bool("report", False, "Collect finished runs into results.csv, results.md and PNGs.")
flags.mark_flags_as_required(["sweep", "root"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

  def body() -> None:
    sweep = sweeps.load_sweep(_SWEEP.value)
    if _REPORT.value:
      result = report.write_report(sweep, _ROOT.value)
      print(result["table"], end="")
      if result["missing"]:
        print(f"not yet finished: {', '.join(result['missing'])}")
      print(f"wrote {_ROOT.value}/results.csv, results.md, runs.csv and {len(result['plots'])} plots")
      return
    runs = sweeps.expand(sweep, _ROOT.value, launch.distributed_args())
    if _DRY_RUN.value:
      for run in runs:
        print(f"# {run.name} [{sweeps.status(run)}]\n{shlex.join(run.command)}")
      return
    outcome = sweeps.run_all(runs)
    failed = [name for name, result in outcome.items() if result.startswith("failed")]
    if failed:
      launch.fail("llm_jax.sweep", ValueError(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}"))

  launch.run_main("llm_jax.sweep", body)


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
