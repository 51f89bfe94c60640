"""The accelerator shapes of tools/gpu_bench.sh (sizes, dtypes, attention, remat) and the batch-fitting
arithmetic of `python -m llm_jax.bench --fit_batch`, checked without an accelerator."""

import os
import subprocess

import flax.linen as nn
import pytest
from conftest import REPO

from llm_jax import bench
from llm_jax import config as config_lib
from llm_jax.model import abstract_params
from llm_jax.model import count_params


@pytest.mark.parametrize("variant,family,millions", [("gpt2_125m", "gpt2", 124), ("gpt2_350m", "gpt2", 355),
                                                     ("llama_1b", "llama", 1039)])
def test_gpu_variants_have_their_published_sizes(variant, family, millions):
  c = bench.bench_config(variant)
  cfg = config_lib.check(c).model
  assert (cfg.family, cfg.compute_dtype, cfg.attention_impl, cfg.remat_policy) == (family, "bfloat16", "auto", "dots")
  assert c.data.seq_len == 2048 and cfg.max_len == 2048
  assert c.tokenizer.vocab_size <= cfg.vocab_size  # a small tokenizer inside the published embedding
  n = count_params(nn.unbox(abstract_params(cfg)))  # shapes only: nothing is allocated
  assert abs(n / 1e6 - millions) < 2, n


def test_existing_bench_variants_are_unchanged():
  tiny = bench.bench_config("tiny")
  assert (tiny.model.num_layers, tiny.model.d_model, tiny.data.seq_len, tiny.global_batch_size) == (4, 128, 64, 12)
  assert tiny.model.compute_dtype == "float32" and tiny.tokenizer.vocab_size == 512


def test_batch_that_fits_scales_temporaries_linearly():
  # 4 devices at global batch 16: 4 rows each, 8 GB of temporaries per device (2 GB a row), 10 GB of state.
  gb = 2**30
  assert bench.batch_that_fits(50 * gb, 10 * gb, 8 * gb, 16, 4) == 20 * 4  # (50 - 10) / 2 = 20 rows a device
  assert bench.batch_that_fits(11 * gb, 10 * gb, 8 * gb, 16, 4) == 4  # never below one row per device
  assert bench.batch_that_fits(10.5 * gb, 10 * gb, 8 * gb, 16, 1) == 1


@pytest.mark.slow
def test_gpu_bench_script_has_valid_syntax_and_a_smoke_mode():
  script = os.path.join(REPO, "tools", "gpu_bench.sh")
  assert subprocess.run(["bash", "-n", script], check=False).returncode == 0
  with open(script, encoding="utf-8") as f:
    text = f.read()
  assert "GPU_BENCH_SMOKE" in text and "jax[cuda12]" in text
