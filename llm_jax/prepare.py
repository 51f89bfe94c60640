"""`python -m llm_jax.prepare --config=experiments/<name>.py [--verify] [--distributed]`: build (or check) the token
stores that training with that config reads, so a run or a sweep starts without tokenising; with several processes
(one per host of a pod) each tokenises its own share of the shards."""

from __future__ import annotations

from typing import Sequence

import jax
from absl import app
from absl import flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from llm_jax import config as config_lib
from llm_jax import launch
from llm_jax import trainer
from llm_jax import writers
from llm_jax.data import store as store_lib
from llm_jax.run_config import RunConfig

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':variant'; override any key with "
    "--config.<key>=<value>.", lock_config=True)
_VERIFY = flags.DEFINE_bool("verify", False, "Also check every shard's sha256 against the manifest (reads the "
                            "whole store, each process its share).")
flags.mark_flags_as_required(["config"])
_DISTRIBUTED = launch.DistributedFlags()


def prepare(run: RunConfig, verify: bool) -> tuple[str, ...]:
  """Builds what is missing of the tokenizer and token stores of `run` (one per source), prints a summary,
  returns the store paths."""
  sync = multihost_utils.sync_global_devices if jax.process_count() > 1 else lambda name: None
  data = trainer.prepare_data(run)  # what a training run with this config reads
  reports = jax.process_index() == 0
  stores = [store_lib.TokenStore.open(path) for path in data.store_paths] if verify or reports else []
  if verify:  # each process reads its share of the shards
    for store in stores:
      store.verify(jax.process_index(), jax.process_count())
    sync("llm_jax:verified")
  for store in stores if reports else ():
    for split in ("train", "validation"):
      counts, entry = store.counts(split), store.manifest["splits"][split]
      writers.console(f"{split}: {counts['documents']:,} documents, {counts['num_tokens']:,} tokens, "
                      f"{counts['bytes'] / 1e6:,.1f} MB of text, {len(entry['shards'])} shard(s), "
                      f"{counts['bytes'] / max(counts['num_tokens'], 1):.2f} bytes/token")
    writers.console(f"token store {store.path} ({store.manifest['dtype']}; tokenizer {data.tokenizer.path})"
                    + ("; every shard matches its sha256" if verify else "")
                    + (f" (checked by {jax.process_count()} processes)" if verify and jax.process_count() > 1 else ""))
  return data.store_paths


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _DISTRIBUTED.initialize("llm_jax.prepare")
  _DISTRIBUTED.run("llm_jax.prepare", lambda: prepare(config_lib.resolve(_CONFIG.value), _VERIFY.value))


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
