"""The benchmark's FLOP formula against a hand count, its JSON fields in a fast run (no time asserted), and where it
caches tokenizers."""

import json

import pytest
from conftest import raises_one_line
from conftest import run_module

from llm_jax import bench
from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import metrics


def test_flops_per_token_matches_a_hand_count():
  c = config_lib.get_config()
  c.model.update({"family": "gpt2", "num_layers": 2, "d_model": 64, "num_heads": 4})
  c.data.seq_len = 64
  cfg = config_lib.resolve(c).model.with_vocab(512)
  # Per layer: q,k,v,o 4·64·64 = 16384; their biases 3·64 + 64 = 256; MLP 2·64·256 = 32768 and
  # biases 256 + 64 = 320; two LayerNorms 4·64 = 256  →  49984. Two layers plus the final norm (128).
  n = 2 * 49984 + 128
  assert n == 100096
  f = metrics.flops_per_token(cfg, 64)
  assert f["non_embedding_params"] == n
  assert f["standard"] == 6 * n + 12 * 2 * 64 * 64  # 6N + 12·L·T·D
  assert f["causal"] == 6 * (n + 64 * 512) + 6 * 2 * 64 * 64  # + the output projection, causal half


def test_llama_non_embedding_count_matches_a_hand_count():
  c = config_lib.get_config()
  c.model.update({"family": "llama", "num_layers": 3, "d_model": 128, "num_heads": 8, "num_kv_heads": 2})
  cfg = config_lib.resolve(c).model.with_vocab(1000)
  assert cfg.d_ff == 384  # 8/3 · 128 rounded up to a multiple of 64
  # q and o: 128·128 each; k and v: 128·(2·16) each; gate, up, down: 3·128·384; two RMSNorm scales.
  per_layer = 2 * 128 * 128 + 2 * 128 * 32 + 3 * 128 * 384 + 2 * 128
  assert metrics.flops_per_token(cfg, 32)["non_embedding_params"] == 3 * per_layer + 128


@pytest.mark.parametrize("values,fragment", [
    (["128", "64"], "--decode_lengths=128,64 must be distinct, ascending and each above the 4-token prompt"),
    (["64", "64"], "--decode_lengths=64,64 must be distinct"),
    (["4", "64"], "--decode_lengths=4,64 must be distinct, ascending and each above the 4-token prompt"),
    ([], "--decode_lengths= must be distinct"),
    (["64", "x"], "--decode_lengths=64,x must be whole numbers")])
def test_bad_decode_lengths_are_one_line_errors(values, fragment):
  with raises_one_line(errors.ConfigError, fragment):
    bench.decode_lengths(values)
  assert bench.decode_lengths(["5", "64", "512"]) == [5, 64, 512]


@pytest.mark.slow
def test_bench_fast_mode_json_has_every_field(tmp_path):
  out = tmp_path / "bench.json"
  result = run_module("llm_jax.bench", "--configs=smoke", "--steps=2", "--repeats=2", "--warmup=1",
                      "--decode_lengths=64,128", f"--json={out}", f"--workdir={tmp_path / 'work'}", devices=1)
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads(out.read_text())["results"][0]
  for key in ("step_time_s", "tokens_per_s", "flops_per_token_standard", "flops_per_token_causal",
              "achieved_flops_per_s", "peak_flops_per_s", "peak_source", "mfu", "compile_s",
              "peak_device_memory_bytes", "host_rss_bytes", "step_time_real_data_s", "real_over_synthetic",
              "decode_tokens_per_s_batch1", "decode_tokens_per_s_batch8", "decode_s_per_token_batch1_by_length",
              "peak_samples_flops_per_s", "peak_winner"):
    assert key in r, key
  # The CPU peak is the fastest of all the matmuls timed, XLA's and numpy's.
  assert r["peak_flops_per_s"] == max(max(v) for v in r["peak_samples_flops_per_s"].values())
  # The smoke shape by hand (2 layers, width 64, vocabulary 512, context 64): N = 100,096 as counted above.
  assert r["flops_per_token_causal"] == 6 * (100096 + 64 * 512) + 6 * 2 * 64 * 64
  assert r["tokens_per_s"] == pytest.approx(8 * 64 / r["step_time_s"])
  assert r["micro_batches"] == 1  # 512 tokens: too few for the CPU's micro-batches
  assert r["achieved_flops_per_s"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token_causal"])
  assert 0.0 < r["mfu"] < 1.0  # a step cannot beat the machine's own matmul peak
  assert list(r["decode_s_per_token_batch8_by_length"]) == ["64", "128"]  # the lengths asked for, in order
  assert r["decode_tokens_per_s_batch8"] == pytest.approx(8 / r["decode_s_per_token_batch8_by_length"]["128"])
  assert "[smoke]" in result.stdout


def test_a_config_given_by_path_caches_its_tokenizer_inside_the_workdir():
  assert bench.tokenizer_dir("/tmp/w", "tiny") == "/tmp/w/tiny/tokenizer"
  assert bench.tokenizer_dir("/tmp/w", "experiments/sotu_small.py:adamw") == (
      "/tmp/w/experiments_sotu_small.py:adamw/tokenizer")
  # os.path.join would have dropped the workdir and written into the config file's own path
  assert bench.tokenizer_dir("/tmp/w", "/home/me/ten_m.py") == "/tmp/w/home_me_ten_m.py/tokenizer"
