"""`python -m llm_jax.harness --model llm_jax --model_args workdir=DIR[,step=N] --tasks ...`: lm_eval's command line
with our backend registered.

lm-eval 0.4.13 finds models only in its own MODEL_MAPPING (no entry points, no plugin path), so a plain
`lm_eval --model llm_jax` cannot see a third-party model; this entry point registers `llm_jax` and then runs
lm_eval's own command line on the same arguments (every lm_eval option works, e.g. --include_path for local
YAML tasks, --num_fewshot, --limit, --output_path).
"""

from __future__ import annotations

import sys

from llm_jax import launch
from llm_jax.evals import harness


def _run() -> None:
  harness.register()
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=import-outside-toplevel
  sys.argv[0] = "lm_eval"
  cli_evaluate()


def main() -> None:
  # A missing workdir, lm_eval or task becomes one line on stderr (exit 2), as in the other entry points.
  launch.run_main("llm_jax.harness", _run)


if __name__ == "__main__":
  main()
