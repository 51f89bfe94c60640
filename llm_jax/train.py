"""`python -m llm_jax.train --config=experiments/<name>.py[:variant] --workdir=DIR`: train (or resume)."""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

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
  config = _CONFIG.value
  keys = tuple(config_flags.get_override_values(flags.FLAGS["config"]))
  if config.plan:
    _DISTRIBUTED.run("llm_jax.train", lambda: planner.run(config, planner.MICRO_BATCHES, planner.REMATS,
                                                          planner.MESHES, None, planner.CACHE_DIR))
  elif config.dry_run:
    _DISTRIBUTED.run("llm_jax.train", lambda: trainer.dry_run(config, keys))
  else:
    _DISTRIBUTED.run("llm_jax.train", lambda: trainer.train_and_evaluate(config, _WORKDIR.value, keys))


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
