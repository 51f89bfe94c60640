"""Tests for weighted mixtures: the cycle against brute-force counting, token shares over 1,000 batches, process
splits and resume, validation rows, a two-source store end to end, and the one-line config errors."""

import json
import os

import numpy as np
import pytest
from conftest import raises_one_line

from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax.data import mixture
from llm_jax.data.packing import PAD_ID
from llm_jax.data.pipeline import PackedRows
from llm_jax.data.pipeline import PreparedData
from llm_jax.data.pipeline import make_eval_batches
from llm_jax.data.pipeline import make_train_iterator
from llm_jax.data.pipeline import prepare_data

SEQ_LEN = 7


def _rows(num_rows: int, first_token: int) -> PackedRows:
  """Rows whose tokens say which component and row they are: first_token + row index."""
  tokens_NxL1 = np.repeat(first_token + np.arange(num_rows, dtype=np.int32)[:, None], SEQ_LEN + 1, axis=1)
  return PackedRows(tokens_NxL1, np.ones_like(tokens_NxL1))


def _prepared(sizes, weights) -> PreparedData:
  parts = tuple(_rows(n, 10_000 * (k + 1)) for k, n in enumerate(sizes))
  return PreparedData(None, mixture.MixtureRows(parts, tuple(weights)), mixture.InterleavedRows(parts, tuple(weights)),
                      0, 0, 0, 0, 0, 0)


def test_the_cycle_matches_brute_force_counting():
  weights = (0.52, 0.31, 0.12, 0.05)
  schedule = mixture.Schedule.make(weights, cycle=512)
  assert schedule.counts_K.tolist() == [266, 159, 61, 26] and schedule.counts_K.sum() == 512  # largest remainders
  positions = np.arange(3 * 512 + 100)
  k_B, j_B = schedule.locate(positions)
  seen = np.zeros(4, dtype=np.int64)
  for position, k, j in zip(positions, k_B, j_B):
    assert j == seen[k]  # the j-th draw from k is the number of earlier positions that drew from k
    seen[k] += 1
    assert np.all(np.abs(seen - (position + 1) * schedule.counts_K / 512) < 1.0 + 1e-9)  # smooth at every prefix
    np.testing.assert_array_equal(schedule.draws_before(int(position) + 1), seen)


@pytest.mark.slow
def test_token_shares_hold_within_one_percent_over_500_batches():
  # 4,000 rows: several epochs of every component (the 400-row one included) and many periods of the 512-draw
  # schedule, whose counts stay within one row of the weights at every prefix (test above).
  weights = (0.6, 0.3, 0.1)
  prepared = _prepared((37, 400, 5), weights)
  iterator = make_train_iterator(prepared, global_batch_size=8, seed=3, process_index=0, process_count=1)
  counts = np.zeros(3)
  first_rows = {k: [] for k in range(3)}
  for _ in range(500):
    tokens_BxL = next(iterator)["inputs"]
    k_B = tokens_BxL[:, 0] // 10_000 - 1
    counts += np.bincount(k_B, minlength=3) * SEQ_LEN
    for k, row in zip(k_B, tokens_BxL[:, 0] % 10_000):
      first_rows[k].append(row)
  shares = counts / counts.sum()
  assert np.all(np.abs(shares - weights) < 0.01 * np.asarray(weights)), shares
  for k, size in enumerate((37, 400, 5)):  # each epoch of a component visits each of its rows once, reshuffled
    rows = np.asarray(first_rows[k])
    epochs = len(rows) // size
    assert epochs >= 1
    for e in range(epochs):
      assert sorted(rows[e * size:(e + 1) * size]) == list(range(size))
  small = np.asarray(first_rows[2])
  assert any(not np.array_equal(small[:5], small[5 * e:5 * e + 5]) for e in range(1, 4))


def test_process_shares_concatenate_and_resume_is_exact():
  prepared = _prepared((37, 400, 5), (0.6, 0.3, 0.1))
  whole = make_train_iterator(prepared, global_batch_size=8, seed=1, process_index=0, process_count=1)
  expected = [next(whole)["inputs"] for _ in range(12)]
  halves = [make_train_iterator(prepared, global_batch_size=8, seed=1, process_index=p, process_count=2)
            for p in range(2)]
  for step in range(12):
    np.testing.assert_array_equal(np.concatenate([next(h)["inputs"] for h in halves]), expected[step])
  resumed = make_train_iterator(prepared, global_batch_size=8, seed=1, process_index=0, process_count=1)
  resumed.set_state({"next_index": 9})
  for step in range(9, 12):
    np.testing.assert_array_equal(next(resumed)["inputs"], expected[step])
  other_seed = make_train_iterator(prepared, global_batch_size=8, seed=2, process_index=0, process_count=1)
  assert not np.array_equal(next(other_seed)["inputs"], expected[0])


def test_validation_reads_each_component_in_order_up_to_the_first_one_that_ends():
  prepared = _prepared((30, 4), (0.5, 0.5))
  # The cycle alternates 0, 1, 0, 1, ...: position 9 would be the second component's fifth row, which it lacks.
  assert prepared.val.num_rows == 9
  batches = make_eval_batches(prepared, batch_size=3, max_batches=0)
  firsts = np.concatenate([b["inputs"][:, 0] for b in batches])
  weights = np.concatenate([b["loss_mask"][:, 0] for b in batches])
  read = firsts[weights > 0]
  assert sorted(read[read < 20_000]) == [10_000, 10_001, 10_002, 10_003, 10_004]
  assert sorted(read[read >= 20_000]) == [20_000, 20_001, 20_002, 20_003]
  assert len(read) == 9 and np.all(firsts[weights == 0] == PAD_ID)


def _text_dir(root, name: str, word: str, count: int) -> str:
  directory = root / name
  directory.mkdir()
  for i in range(count):
    (directory / f"{i:03d}.txt").write_text(" ".join(f"{word}{(i * j) % 17}" for j in range(300)) + "\n")
  return str(directory / "*.txt")


def _mixture_config(tmp_path, weights=(0.75, 0.25)):
  config = config_lib.get_config()
  config.data.corpus = "mixture"
  config.data.store_dir = str(tmp_path / "stores")
  config.data.seq_len = 32
  config.data.mixture = {
      "alpha": {"corpus": "text_files", "weight": weights[0], "validation_fraction": 0.2,
                "text_files": _text_dir(tmp_path, "a", "alpha", 20)},
      "beta": {"corpus": "text_files", "weight": weights[1], "validation_fraction": 0.2,
               "text_files": _text_dir(tmp_path, "b", "beta", 10)}}
  config.tokenizer.vocab_size = 300
  config.sample.max_length = 32
  return config


def test_two_text_sources_get_their_own_stores_and_mix_by_weight(tmp_path):
  config = _mixture_config(tmp_path)
  run = config_lib.resolve(config)
  data_cfg = run.data
  assert [(c.name, c.weight) for c in data_cfg.mixture] == [("alpha", 0.75), ("beta", 0.25)]
  prepared = prepare_data(data_cfg, run.tokenizer, log=lambda line: None)
  assert len(set(prepared.store_paths)) == 2
  manifests = [json.load(open(os.path.join(p, "manifest.json"))) for p in prepared.store_paths]
  assert [m["splits"]["train"]["documents"] + m["splits"]["validation"]["documents"] for m in manifests] == [20, 10]
  alpha_ids = set(prepared.tokenizer.encode("alpha3 alpha5")) - set(prepared.tokenizer.encode("beta3 beta5"))
  iterator = make_train_iterator(prepared, global_batch_size=4, seed=0, process_index=0, process_count=1)
  from_alpha = sum(bool(set(row.tolist()) & alpha_ids) for _ in range(100) for row in next(iterator)["inputs"])
  assert from_alpha == 300  # 3 of every 4 rows of the stream come from alpha (the cycle is exact at 4 | 4096)
  again = prepare_data(data_cfg, config_lib.resolve(config).tokenizer, log=lambda line: None)
  assert again.store_paths == prepared.store_paths  # a restart reuses both stores


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c.data.mixture.alpha.update({"colour": 1}), "data.mixture.alpha has unknown setting(s) colour"),
    (lambda c: c.data.mixture.alpha.update({"weight": -1.0}), "data.mixture.alpha.weight=-1.0 must be a positive"),
    (lambda c: c.data.mixture.beta.update({"corpus": "mixture"}), "data.mixture.beta.corpus='mixture' is not one"),
    (lambda c: c.data.mixture.beta.update({"corpus": "sotu"}), "data.mixture.beta.text_files is set but"),
    (lambda c: c.data.mixture.beta.update({"text_files": "/nowhere/*.txt"}),
     "data.mixture.beta.text_files='/nowhere/*.txt' matches no files"),
    (lambda c: c.data.update({"text_field": "body"}), "data.text_field is set but data.corpus='mixture' reads"),
    (lambda c: setattr(c.data, "mixture", {}), "data.corpus='mixture' needs components"),
    (lambda c: c.data.update({"corpus": "sotu"}), "data.mixture is set but data.corpus='sotu' ignores it"),
    (lambda c: c.data.mixture.beta.update({"weight": 1e-5}),
     "data.mixture.beta.weight=1e-05 is under 1/4096 of the weights' sum 0.75001"),
])
def test_bad_mixtures_fail_in_one_line(tmp_path, edit, fragment):
  config = _mixture_config(tmp_path)
  edit(config)
  with raises_one_line(errors.ConfigError, fragment):
    config_lib.check(config)
