"""The CPU peak for MFU: the max of every measured XLA and numpy matmul sample, cached, and skipped when pinned."""

import jax
import pytest

from llm_jax import metrics


@pytest.fixture(name="fake_timers")
def fake_timers_fixture(monkeypatch):
  """Replaces both matmul timers by fixed samples and counts the calls; clears the per-process cache around it."""
  calls = []

  def fake(name, rates):
    def timer(n, warmup, repeats):
      calls.append(name)
      return rates
    return timer

  monkeypatch.setattr(metrics, "_xla_matmul_rates", fake("xla", (150e9, 210e9, 180e9)))
  monkeypatch.setattr(metrics, "_numpy_matmul_rates", fake("numpy", (240e9, 305e9, 290e9)))
  metrics.measure_cpu_peak.cache_clear()
  yield calls
  metrics.measure_cpu_peak.cache_clear()


def test_cpu_peak_is_the_max_of_all_samples_with_its_spread(fake_timers):
  peak = metrics.measure_cpu_peak()
  assert peak.flops_per_s == 305e9 and peak.winner == "numpy"
  assert peak.samples == {"xla": (150e9, 210e9, 180e9), "numpy": (240e9, 305e9, 290e9)}
  text = peak.describe()
  assert "numpy won" in text and "xla min/median/max 150/180/210" in text and "numpy min/median/max 240/290/305" in text
  metrics.measure_cpu_peak()
  assert fake_timers == ["xla", "numpy"]  # measured once per process: the second call is the cache


def test_peak_flops_total_on_cpu_reports_the_best_sample(fake_timers):
  assert jax.default_backend() == "cpu"
  peak, source = metrics.peak_flops_total()
  assert peak == 305e9  # the host's figure, not multiplied by the simulated device count
  assert "numpy won" in source


def test_pinned_peak_skips_measuring(fake_timers):
  peak, source = metrics.peak_flops_total(per_device=1e11)
  assert peak == 1e11 * jax.device_count()
  assert source == "config peak_flops_per_device"
  assert fake_timers == []


def test_real_timers_return_positive_rates():
  # Small n: this checks the plumbing (warm-up, timing, units), not the machine.
  for timer in (metrics._xla_matmul_rates, metrics._numpy_matmul_rates):
    rates = timer(64, 1, 2)
    assert len(rates) == 2 and all(r > 0 for r in rates)
