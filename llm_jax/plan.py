"""`python -m llm_jax.plan --config=experiments/bench.py:llama_1b --config.topology=v5p-8`: rank mesh x remat x
micro-batch candidates for a TPU slice by estimated tokens/s, from compiles through libtpu (`llm_jax.planner`)."""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from llm_jax import config as config_lib
from llm_jax import launch
from llm_jax import planner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:variant]); set "
                                          "--config.topology=<slice> and override any key.", lock_config=True)
_MICRO = flags.DEFINE_list("micro_batches", [str(m) for m in planner.MICRO_BATCHES], "Micro-batches per chip to "
                           "consider (sequences each data-parallel chip holds per update).")
_REMAT = flags.DEFINE_list("remat", list(planner.REMATS), "Remat policies to consider.")
_MESHES = flags.DEFINE_list("meshes", list(planner.MESHES), "Mesh splits: fsdp (everything over fsdp), data (pure data "
                            "parallelism), fsdp_tensorN (tensor parallelism of N inside fsdp).")
_JSON = flags.DEFINE_string("json", None, "Also write every candidate (fitting or not) to this JSON file.")
_CACHE = flags.DEFINE_string("cache_dir", planner.CACHE_DIR,
                             "Where candidates' rows are kept (under plan/): a rerun reads them instead of compiling.")
flags.mark_flags_as_required(["config"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  micro = [int(m) for m in _MICRO.value]
  config = _CONFIG.value
  config.plan = True  # what this program does, so the topology is read

  def body() -> None:
    planner.run(config_lib.resolve(config), micro, _REMAT.value, _MESHES.value, _JSON.value, _CACHE.value)

  launch.run_main("llm_jax.plan", body)


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
