"""Tests for the shipped sotu party task: a split by speech, labels from metadata.csv, and the committed files."""

import csv
import filecmp
import importlib.util
import json
import os
import sys

import pytest
from conftest import REPO

from llm_jax.evals import scoring

SHIPPED = os.path.join(REPO, "experiments", "data", "sotu_party")


def _load_experiment():
  spec = importlib.util.spec_from_file_location("sotu_party", os.path.join(REPO, "tools", "sotu_party.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
  spec.loader.exec_module(module)
  return module


party = _load_experiment()


@pytest.fixture(name="rows", scope="module")
def rows_fixture():
  return party.build_rows()


def test_no_speech_and_no_paragraph_is_on_both_sides(rows):
  train_speeches, test_speeches = {r.speech for r in rows["train"]}, {r.speech for r in rows["test"]}
  assert not train_speeches & test_speeches
  assert not {r.text for r in rows["train"]} & {r.text for r in rows["test"]}
  assert len(test_speeches) >= 30 and len(train_speeches) >= 3 * len(test_speeches) - 20
  assert {r.party for r in rows["test"]} == {r.party for r in rows["train"]} == set(party.PARTIES)


def test_labels_are_the_metadata_party_of_the_speech(rows):
  with open(os.path.join(party.sotu_dir(), "metadata.csv"), encoding="utf-8") as f:
    metadata = {r["fileid"]: r for r in csv.DictReader(f)}
  for r in rows["train"] + rows["test"]:
    assert r.party == metadata[r.speech]["party"]
    assert party.MIN_CHARS <= len(r.text) <= party.MAX_CHARS
  # By hand: Lincoln was a Republican, Franklin Roosevelt a Democrat; Washington (no party) is left out.
  by_speech = {r.speech: r.party for r in rows["train"] + rows["test"]}
  assert by_speech["1861-Lincoln-1"] == "Republican" and by_speech["1934-Roosevelt-1"] == "Democratic"
  assert not any(s.startswith("1790-Washington") for s in by_speech)


def test_the_committed_files_are_what_the_script_writes(rows, tmp_path):
  out = tmp_path / "sotu_party"
  party.write_files(str(out), rows)
  names = sorted(os.listdir(out))
  assert names == sorted(os.listdir(SHIPPED)) and "sotu_party.yaml" in names
  for name in names:
    if name.endswith(".jsonl"):
      assert filecmp.cmp(out / name, os.path.join(SHIPPED, name), shallow=False), "rerun tools/sotu_party.py"
  items = scoring.read_items(os.path.join(SHIPPED, "test_mc.jsonl"))
  with open(os.path.join(SHIPPED, "test.jsonl"), encoding="utf-8") as f:
    sft = [json.loads(line) for line in f]
  assert len(items) == len(sft) == len(rows["test"])
  for item, row, r in zip(items, sft, rows["test"]):
    assert item.context == row["prompt"] == f"Paragraph: {r.text}\nParty:"
    assert item.choices[item.label] == row["completion"] == f" {r.party}"


def test_few_shot_draws_are_seeded_short_train_rows(rows):
  draws = [party.draw_shots(rows["train"], 2, seed) for seed in (0, 1, 2)]
  assert draws[0] == party.draw_shots(rows["train"], 2, 0) and draws[0] != draws[1]
  train = set(rows["train"])
  assert all(r in train and len(r.text) <= party.SHOT_MAX_CHARS for d in draws for r in d)
  prefix = party.few_shot_prefix(draws[0])
  assert prefix == "".join(f"Paragraph: {r.text}\nParty: {r.party}\n\n" for r in draws[0])
  base = party.baselines(rows)
  shares = [sum(r.party == p for r in rows["test"]) / len(rows["test"]) for p in party.PARTIES]
  assert base["chance"] == 0.5 and base["majority"] in shares


def test_the_committed_measurements_are_of_todays_split_and_plot_with_the_sweep(rows, tmp_path):
  measured = os.path.join(REPO, "experiments", "results", "sotu_party", "zero_few_shot.jsonl")
  with open(measured, encoding="utf-8") as f:
    header = json.loads(f.readline())
  assert header["majority"] == pytest.approx(party.baselines(rows)["majority"], abs=1e-12)
  assert header["rows"]["test"] == {p: sum(r.party == p for r in rows["test"]) for p in party.PARTIES}
  runs = tmp_path / "runs.csv"
  with open(runs, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, ["variant", "zero_shot/test_mc/accuracy", "zero_shot/test_mc/accuracy_norm"])
    writer.writeheader()
    writer.writerow({"variant": "model.lora_rank=0,x", "zero_shot/test_mc/accuracy": 0.6,
                     "zero_shot/test_mc/accuracy_norm": 0.59})
    writer.writerow({"variant": "model.lora_rank=8,x", "zero_shot/test_mc/accuracy": 0.58,
                     "zero_shot/test_mc/accuracy_norm": 0.59})
  party.plot_table(measured, str(runs), str(tmp_path / "table.png"))
  with open(tmp_path / "table.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
