"""What a run checks against its workdir's history before it reads any data: a start from scratch that would
replace an earlier run's record, and a resume whose model, seed, optimizer, data stream or tokenizer differ from the
newest checkpoint's (the stream record itself is built here and saved with every checkpoint)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from llm_jax import checkpoint as checkpoint_lib
from llm_jax import errors
from llm_jax import paths
from llm_jax import workdir as workdir_lib
from llm_jax.data import corpus
from llm_jax.run_config import RunConfig
from llm_jax.sweeps import runcard


def read_history(run: RunConfig, workdir: str) -> dict[str, Any] | None:
  """The metadata of the workdir's newest readable checkpoint (None: none), after refusing a start that would
  silently lose or skip work (`check_history`). Reads only: a refused start leaves the workdir as it was."""
  directory = workdir_lib.checkpoint_dir(workdir)
  if not paths.as_path(directory).exists():
    unusable = paths.as_path(checkpoint_lib.unusable_dir(directory))
    check_history(run, workdir, directory, [], unusable.is_dir() and any(unusable.iterdir()), existed=False)
    return None
  ckpt = checkpoint_lib.Checkpointer(directory, async_save=False)
  try:
    check_history(run, workdir, directory, ckpt.steps(), bool(ckpt.quarantined()), existed=True)
    return newest_meta(ckpt)
  finally:
    ckpt.close()


def check_history(run: RunConfig, workdir: str, directory: str, steps: list[int],
                  quarantined: bool, existed: bool) -> None:
  """Refuses a workdir whose newest checkpoint (of `steps`, in `directory`) lies past the run's end (it would
  silently train nothing), a start from scratch in a workdir that shows a run's history but has lost its checkpoints
  (unless run.restart), and run.restart beside checkpoints that would be resumed instead.

  History: run.json says a run finished or stopped (each ends with a checkpoint), or run.json or metrics.jsonl exist
  while checkpoints/ does not (a run creates it before writing either). A run killed before its first checkpoint
  leaves an empty checkpoints/ and a 'running' run.json: rerunning it starts over, as before. With `quarantined`
  (earlier runs moved every checkpoint aside) the trainer's restore refuses, naming them.
  """
  if steps and steps[-1] > run.loop.num_train_steps:
    raise errors.RunError(f"the workdir already holds checkpoint {steps[-1]}, past "
                          f"num_train_steps={run.loop.num_train_steps}; raise num_train_steps or use another --workdir")
  if steps and run.restart:
    raise errors.RunError(f"restart=True but {directory} holds checkpoints {steps}, which the run would resume rather "
                          "than restart; drop --config.restart to resume, or move that folder away to start over")
  if steps or run.restart or quarantined:
    return
  card = runcard.read(workdir) or {}
  metrics = paths.as_path(workdir_lib.path(workdir, workdir_lib.METRICS_FILE))
  has_metrics = metrics.exists() and paths.size(os.fspath(metrics)) > 0
  if card.get("status") in ("finished", "stopped") or (not existed and (card or has_metrics)):
    what = f"{workdir_lib.RUN_FILE} says {card['status']!r}" if card.get("status") else (
        f"it has {workdir_lib.RUN_FILE if card else workdir_lib.METRICS_FILE}")
    raise errors.RunError(f"--workdir={workdir} holds an earlier run ({what}) but no checkpoint in {directory}; "
                          "starting from scratch would replace its metrics: restore the checkpoints, or pass "
                          "--config.restart=True to start over here, or use a new --workdir")


def stream_record(run: RunConfig) -> dict[str, Any]:
  """What decides the training data order and the validation set, saved with every checkpoint and compared on
  resume (`workdir.check_data_stream`); the seed and a given tokenizer file's hash are saved beside it."""
  t = run.tokenizer
  record = {"global_batch_size": run.step.global_batch_size, "data.seq_len": run.data.seq_len,
            "sources": corpus.stream_identity(run.data),
            "tokenizer": None if t.path else {"model_type": t.model_type, "vocab_size": t.vocab_size,
                                              "byte_fallback": t.byte_fallback}}
  return json.loads(json.dumps(record))  # as the checkpoint's JSON gives it back


def newest_meta(ckpt: checkpoint_lib.Checkpointer) -> dict[str, Any] | None:
  """The metadata of the newest checkpoint whose metadata reads (a damaged one is left to the restore, which moves
  it aside); a storage error that outlasts the retries is refused here, before any data is read."""
  for step in reversed(ckpt.steps()):
    try:
      return ckpt.read_meta(step)
    except errors.CheckpointError:
      raise
    except Exception:  # pylint: disable=broad-except  # damage: the restore reports it and tries an older one
      continue
  return None


def check_against_checkpoint(run: RunConfig, saved: dict[str, Any] | None,
                              stream: dict[str, Any]) -> None:
  """Before any data is read or tokenised: refuses a resume whose model, seed, optimizer, data stream or given
  tokenizer file differ from the newest checkpoint's (the restore checks the checkpoint it reads again)."""
  if saved is None:
    return
  workdir_lib.check_data_stream(saved, stream)
  workdir_lib.check_seed(saved, run.seed)
  workdir_lib.check_optim_name(saved, run.optim.name)
  saved_vocab = (saved.get("model") or {}).get("vocab_size") or 1
  workdir_lib.check_model_dims(saved, dataclasses.asdict(run.model.with_vocab(saved_vocab)))
  if run.tokenizer.path:
    path = run.tokenizer.path
    workdir_lib.check_tokenizer(saved, paths.file_sha256(path), path)
