"""tools/attention_memory.py's batch search, against a peak that is linear in the batch (as activations are)."""

import importlib.util
import os

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "attention_memory", os.path.join(os.path.dirname(__file__), "..", "tools", "attention_memory.py"))


@pytest.fixture(name="tool", scope="module")
def tool_fixture():
  module = importlib.util.module_from_spec(_SPEC)
  _SPEC.loader.exec_module(module)
  return module


@pytest.mark.parametrize("fixed, per_row, limit, expected", [
    (2.0, 1.0, 16.0, 14),  # 2 + 14 rows per chip = 16 exactly fits
    (2.0, 1.0, 15.9, 13),
    (17.0, 1.0, 16.0, 0),  # one row per chip does not fit
    (1.0, 0.01, 16.0, 64),  # capped at max_rows
])
def test_largest_batch_is_the_largest_multiple_of_the_chips_that_fits(tool, fixed, per_row, limit, expected):
  chips = 8
  calls = []

  def measure(batch):
    calls.append(batch)
    return fixed + per_row * batch / chips

  batch, peaks = tool.largest_batch(measure, chips, limit, max_rows=64)
  assert batch == expected * chips
  assert all(peaks[b] <= limit for b in peaks if b <= batch)
  assert len(calls) <= 4  # two to fit the line, one or two to check


def test_a_peak_that_grows_faster_than_the_line_is_stepped_down_until_it_fits(tool):
  chips = 8
  measure = lambda batch: 2.0 + (batch / chips) ** 1.5  # noqa: E731
  batch, peaks = tool.largest_batch(measure, chips, 16.0, max_rows=64)
  rows = batch // chips
  assert peaks[batch] <= 16.0 and 2.0 + (rows + 1) ** 1.5 > 16.0
