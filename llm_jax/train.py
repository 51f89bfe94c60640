"""`python -m llm_jax.train --config=experiments/<name>.py[:variant] --workdir=DIR`: train (or resume)."""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from llm_jax import config as config_lib
from llm_jax import launch
from llm_jax import planner
from llm_jax import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':variant'; override any key with "
    "--config.<key>=<value>.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer, logs.")
flags.mark_flags_as_required(["config", "workdir"])
_DISTRIBUTED = launch.DistributedFlags()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value.strip():
    launch.fail("llm_jax.train", ValueError("--workdir is empty; pass the directory for checkpoints and logs"))
  _DISTRIBUTED.initialize("llm_jax.train")
  keys = tuple(config_flags.get_override_values(flags.FLAGS["config"]))

  def body() -> None:
    run = config_lib.resolve(_CONFIG.value, keys)
    if run.plan:
      planner.run(run, planner.MICRO_BATCHES, planner.REMATS, planner.MESHES, None, planner.CACHE_DIR)
    elif run.dry_run:
      trainer.dry_run(run)
    else:
      trainer.train_and_evaluate(run, _WORKDIR.value)

  _DISTRIBUTED.run("llm_jax.train", body)


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
