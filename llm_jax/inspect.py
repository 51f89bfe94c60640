"""`python -m llm_jax.inspect --workdir=DIR --text="..." --out=OUT`: where a model is surprised, what it attends to,
and what each layer would predict, for one text, as pictures and HTML (see `llm_jax.interp`).

Writes into OUT: tokens.png and tokens.html (per-token loss; the page shows each token's exact loss and top-5
predictions on hover), attention_layer<i>.png (one panel per head, log-scaled) and attention_heads.txt (per-head
entropy, first-token and previous-token weight), lens.png (the logit lens), summary.json; with --compare=DIR2 also
compare.png and compare.html (the second model's loss minus the first's, token by token). The text is cleaned and
scored as `llm_jax.evaluate --text_files` scores a file, so the mean loss and bits per byte are the ones it reports.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app
from absl import flags

from llm_jax import errors
from llm_jax import launch
from llm_jax import paths
from llm_jax import workdir as workdir_lib
from llm_jax.data.text import clean_text
from llm_jax.data.text import read_utf8
from llm_jax.evals import documents as doc_eval
from llm_jax.interp import analysis
from llm_jax.interp import report
from llm_jax.tokenizer import load_tokenizer

_WORKDIR = flags.DEFINE_string("workdir", None, "A directory written by llm_jax.train or llm_jax.convert.")
_TEXT = flags.DEFINE_string("text", "", "The text to inspect.")
_TEXT_FILE = flags.DEFINE_string("text_file", "", "A UTF-8 file holding the text to inspect (instead of --text).")
_OUT = flags.DEFINE_string("out", None, "Folder for the pictures, pages and summary.json (created if missing).")
_COMPARE = flags.DEFINE_string("compare", "", "A second workdir with the same tokenizer: adds its per-token loss "
                               "difference from --workdir's.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint of --workdir to inspect; default the newest.")
_COMPARE_STEP = flags.DEFINE_integer("compare_step", None, "Checkpoint of --compare; default the newest.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Window in tokens; 0: the run's data.seq_len.")
_STRIDE = flags.DEFINE_integer("stride", 0, "Tokens a window advances through a text longer than --seq_len; 0: the "
                               "text must fit one window.")
_TOP = flags.DEFINE_integer("top", 10, "With --compare: how many positions of largest difference to list.")
flags.mark_flags_as_required(["workdir", "out"])


def _read_text() -> str:
  """The text, cleaned as training corpora and `llm_jax.evaluate --text_files` clean it."""
  if bool(_TEXT.value) == bool(_TEXT_FILE.value):
    raise errors.ConfigError("pass the text with exactly one of --text and --text_file")
  if _TEXT_FILE.value and not paths.as_path(_TEXT_FILE.value).is_file():
    raise errors.MissingFileError(f"--text_file={_TEXT_FILE.value} does not exist; pass an existing UTF-8 file")
  text = clean_text(read_utf8(_TEXT_FILE.value) if _TEXT_FILE.value else _TEXT.value)
  if not text:
    raise errors.DataError("the text is empty (after cleaning); pass some text with --text or --text_file")
  return text


def _check_inputs(text: str) -> int:
  """One-line errors before any checkpoint is restored or program compiled; returns the window length."""
  for name, flag in (("seq_len", _SEQ_LEN), ("stride", _STRIDE)):
    if flag.value < 0:
      raise errors.ConfigError(f"--{name}={flag.value} must be >= 0 (0: the default)")
  if _TOP.value < 1:
    raise errors.ConfigError(f"--top={_TOP.value} must be at least 1")
  cfg, tokenizer_path = workdir_lib.read_model_card(_WORKDIR.value)
  seq_len = _SEQ_LEN.value or doc_eval.default_seq_len(_WORKDIR.value, cfg)
  doc_eval.check_seq_len(cfg, seq_len)
  analysis.check_text(text, len(load_tokenizer(tokenizer_path).encode(text)), seq_len, _STRIDE.value)
  if _COMPARE_STEP.value is not None and not _COMPARE.value:
    raise errors.ConfigError("--compare_step is set but --compare is not; pass --compare=DIR or drop --compare_step")
  if _COMPARE.value:
    other_cfg, other_path = workdir_lib.read_model_card(_COMPARE.value, "--compare")
    if paths.file_sha256(other_path) != paths.file_sha256(tokenizer_path):
      raise errors.ConfigError(f"--compare={_COMPARE.value} has another tokenizer ({other_path}) than --workdir "
                               f"({tokenizer_path}), so their tokens do not line up; compare models that share a "
                               "tokenizer")
    doc_eval.check_seq_len(other_cfg, seq_len)
  return seq_len


def _inspect(workdir: str, step: int | None, text: str, seq_len: int) -> tuple[analysis.Inspection, dict, object]:
  loaded = workdir_lib.load_model(workdir, step)
  ins = analysis.inspect_text(loaded.params, loaded.cfg, loaded.tokenizer, text, seq_len=seq_len,
                              stride=_STRIDE.value)
  impl = loaded.cfg.attention_impl
  aside = "" if impl == "einsum" else f" (model.attention_impl={impl!r} set aside: it keeps no probabilities)"
  note = f"attention read through the reference einsum path in one query block{aside}"
  return ins, {"workdir": workdir, "checkpoint_step": loaded.step, "note": note}, loaded.tokenizer


def _run() -> None:
  text = _read_text()
  seq_len = _check_inputs(text)
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  ins, meta, tokenizer = _inspect(_WORKDIR.value, _STEP.value, text, seq_len)
  print(meta["note"], flush=True)
  print(f"{_WORKDIR.value} at step {meta['checkpoint_step']}: {report.loss_line(ins)}", flush=True)
  summary = report.write_inspection(out, ins, tokenizer, meta)
  print(report.heads_text(summary["heads"]), end="", flush=True)
  if _COMPARE.value:
    other, other_meta, _ = _inspect(_COMPARE.value, _COMPARE_STEP.value, text, seq_len)
    print(f"{_COMPARE.value} at step {other_meta['checkpoint_step']}: {report.loss_line(other)}", flush=True)
    names = tuple(f"{os.path.basename(os.path.normpath(m['workdir']))}@{m['checkpoint_step']}"
                  for m in (meta, other_meta))
    if names[0] == names[1]:
      names = ("--workdir", "--compare")
    compared = report.write_comparison(out, ins, other, *names, _TOP.value)
    summary["compare"] = {**other_meta, **compared}
    summary["files"] += compared["files"]
    print(f"largest differences ({names[1]} minus {names[0]}, nats):", flush=True)
    for d in compared["largest"]:
      print(f"  position {d['position']:>5} {d['piece']!r:>14} after {d['context'][-30:]!r}: "
            f"{d['loss_a']:.3f} -> {d['loss_b']:.3f} ({d['difference']:+.3f})", flush=True)
  report.write_summary(out, summary)
  print(f"wrote {', '.join(summary['files'])} into {out}", flush=True)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  launch.run_main("llm_jax.inspect", _run)


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
