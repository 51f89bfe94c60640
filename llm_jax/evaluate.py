"""`python -m llm_jax.evaluate --workdir=DIR`: whole-document loss, perplexity and bits per byte, or zero-shot accuracy.

The document metrics are reported as doc_loss / doc_perplexity (see `llm_jax.evals.documents` for how they
differ from the trainer's val_loss on packed rows).
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app
from absl import flags

from llm_jax import errors
from llm_jax import launch
from llm_jax import paths
from llm_jax.evals import documents as doc_eval

_WORKDIR = flags.DEFINE_string("workdir", None, "A directory written by llm_jax.train or llm_jax.convert.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to evaluate; default the newest.")
_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "train"], "Split of the run's corpus (config.json).")
_TEXT_FILES = flags.DEFINE_string("text_files", "", "Comma-separated globs of UTF-8 text to evaluate instead; "
                                  "each file is one document.")
_ZERO_SHOT = flags.DEFINE_string("zero_shot", "", "A JSONL file of {context, choices, label} items: report "
                                 "zero-shot accuracy instead of perplexity.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Window in tokens; 0: the run's data.seq_len.")
_STRIDE = flags.DEFINE_integer("stride", 0, "Tokens a window advances in long documents; 0: seq_len.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Rows scored per forward pass.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON report path; default DIR/eval_<split>_<step>.json or "
                              "DIR/zero_shot_<name>_<step>.json.")
flags.mark_flag_as_required("workdir")


def _check_writable(path: str, what: str = "") -> None:
  """Creates the report's directory and test-opens the file, so an unwritable --output fails before scoring (on an
  object store, where nothing opens for appending, it only checks that the store is reachable)."""
  if not paths.is_local(path):
    paths.check_reachable(path, "--output")
    return
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    paths.probe_writable(path)  # leaves no empty report behind if the evaluation then fails
  except OSError as e:
    raise errors.RunError(f"cannot write {what or '--output=' + path} ({e.strerror or e}); pass a writable "
                          "--output") from None


def _check_flags() -> None:
  """One-line errors for flag values that would otherwise fail deep inside (or after) the evaluation."""
  if _BATCH_SIZE.value < 1:
    raise errors.ConfigError(f"--batch_size={_BATCH_SIZE.value} must be at least 1")
  ignored, why = (), ""
  if _ZERO_SHOT.value:
    ignored, why = ("split", "text_files", "seq_len", "stride"), "--zero_shot scores whole items"
  elif _TEXT_FILES.value:
    ignored, why = ("split",), "--text_files evaluates those files instead"
  for name in ignored:
    if flags.FLAGS[name].present:
      raise errors.ConfigError(f"--{name} is set but {why} and ignores it; drop --{name}")
  for name, flag in (("seq_len", _SEQ_LEN), ("stride", _STRIDE)):
    if flag.value < 0:
      raise errors.ConfigError(f"--{name}={flag.value} must be >= 0 (0: the default)")
  if _OUTPUT.value:
    _check_writable(_OUTPUT.value)
  elif paths.is_local(_WORKDIR.value) and os.path.isdir(_WORKDIR.value):
    # The default report is named after the checkpoint step, known only once loaded: probe the folder.
    _check_writable(os.path.join(_WORKDIR.value, f".eval_probe{os.getpid()}.json"),
                    f"the report into --workdir={_WORKDIR.value}")


def _run() -> None:
  _check_flags()
  workdir = _WORKDIR.value
  if _ZERO_SHOT.value:
    report = doc_eval.zero_shot_workdir(workdir, _ZERO_SHOT.value, step=_STEP.value, batch_size=_BATCH_SIZE.value)
    name = os.path.splitext(os.path.basename(_ZERO_SHOT.value))[0]
    default = f"zero_shot_{name}_{report['checkpoint_step']}.json"
    line = (f"zero-shot {name} at step {report['checkpoint_step']}: accuracy {report['accuracy']:.4f} "
            f"(summed log-likelihood), {report['accuracy_norm']:.4f} (per token) on {report['items']} items")
  else:
    report = doc_eval.evaluate_workdir(workdir, step=_STEP.value, split=_SPLIT.value, text_files=_TEXT_FILES.value,
                                       seq_len=_SEQ_LEN.value, stride=_STRIDE.value, batch_size=_BATCH_SIZE.value)
    default = f"eval_{report['split']}_{report['checkpoint_step']}.json"
    line = (f"{report['split']} at step {report['checkpoint_step']}: doc_loss {report['doc_loss']:.4f} | "
            f"doc_perplexity {report['doc_perplexity']:.3f} | bits/byte {report['bits_per_byte']:.4f} | "
            f"{report['tokens']:,.0f} tokens | {report['tokens_per_s']:,.0f} tok/s")
  output = _OUTPUT.value or os.path.join(workdir, default)
  doc_eval.write_report(output, report)
  print(line, flush=True)
  print(f"wrote {output}", flush=True)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  launch.run_main("llm_jax.evaluate", _run)


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
