"""`python -m llm_jax.convert --from_hf=HF_DIR --workdir=DIR` (or `--workdir=DIR --to_hf=HF_DIR`): weight conversion."""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags

from llm_jax import errors
from llm_jax import launch
from llm_jax.hf import files as hf_files

_FROM_HF = flags.DEFINE_string("from_hf", None, "A local Hugging Face GPT-2 or Llama checkpoint directory to read.")
_TO_HF = flags.DEFINE_string("to_hf", None, "A directory to write the workdir's model to, in Hugging Face format.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The llm_jax workdir to write (--from_hf) or read (--to_hf).")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "With --to_hf: the checkpoint to export; default the newest.")
flags.mark_flag_as_required("workdir")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

  def body() -> None:
    if bool(_FROM_HF.value) == bool(_TO_HF.value):
      raise errors.ConfigError("pass exactly one of --from_hf=HF_DIR (into --workdir) or --to_hf=HF_DIR (from "
                               "--workdir)")
    if _FROM_HF.value and _STEP.value is not None:
      raise errors.ConfigError("--checkpoint_step is set but --from_hf writes a new workdir and ignores it; drop "
                               "--checkpoint_step (it picks the checkpoint --to_hf exports)")
    if _FROM_HF.value:
      cfg, num_params = hf_files.import_hf(_FROM_HF.value, _WORKDIR.value)
      print(f"converted {cfg.family} ({num_params:,} parameters, {cfg.num_layers} layers) from "
            f"{_FROM_HF.value} into {_WORKDIR.value}", flush=True)
    else:
      cfg, step = hf_files.export_hf(_WORKDIR.value, _TO_HF.value, _STEP.value)
      print(f"wrote {cfg.family} checkpoint {step} of {_WORKDIR.value} to {_TO_HF.value}", flush=True)

  launch.run_main("llm_jax.convert", body)


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
