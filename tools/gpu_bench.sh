#!/usr/bin/env bash
# The GPU benchmark in one command: our step at 125M, 350M and 1B parameters and the PyTorch reference at 125M.
#
# Usage:  tools/gpu_bench.sh [OUT.json]          on a CUDA host with network access (about 10 minutes)
#         GPU_BENCH_SMOKE=1 tools/gpu_bench.sh    on CPU at the smoke/tiny shapes, installing nothing
#
# Full mode makes a venv (GPU_BENCH_VENV, default /tmp/llm_jax_gpu_venv), installs jax[cuda12] at the version
# requirements.txt pins, this project (pip install -e .) and torch (PyPI's Linux wheel is the CUDA build), then:
#   1. python -m llm_jax.bench at gpt2_125m, gpt2_350m, llama_1b (llm_jax/bench_shapes.py: bf16, context 2048,
#      attention_impl 'auto', which on GPU is cuDNN's fused kernel (llm_jax/attention_kernels.py; never yet run on a
#      GPU, see BENCHMARKS.md), remat 'dots'), each batch fitted to device memory by a dry-run compile (--fit_batch);
#   2. tools/compare_torch.py at gpt2_125m: torch on CUDA under bf16 autocast against our bf16 step,
#      same init and batches, JAX told not to preallocate so both fit on the GPU;
# and merges both JSON files into OUT.json (default gpu_bench.json). Each stage has its own time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_bench.json}"
WORK="${GPU_BENCH_WORKDIR:-/tmp/llm_jax_gpu_bench}"
mkdir -p "$WORK"

if [[ "${GPU_BENCH_SMOKE:-0}" == "1" ]]; then
  # The same stages at CPU shapes with whatever python is on PATH (or $PYTHON): checks the script, not a GPU.
  PY="${PYTHON:-python3}"
  BENCH_CONFIGS="smoke,tiny"
  BENCH_ARGS=(--steps=2 --repeats=2 --warmup=1)
  TORCH_CONFIG="smoke"
  TORCH_ARGS=(--device=cpu --warmup=1 --steps=1 --repeats=2 --eval_batches=2)
  LIMIT_S=300
else
  VENV="${GPU_BENCH_VENV:-/tmp/llm_jax_gpu_venv}"
  JAX_VERSION="$(sed -n 's/^jax==//p' requirements.txt)"
  TORCH_VERSION="$(sed -n 's/^torch==//p' requirements-test.txt)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "jax[cuda12]==${JAX_VERSION}" -r requirements.txt -e . "torch==${TORCH_VERSION}"
  PY="$VENV/bin/python"
  "$PY" -c "import jax, torch; assert jax.default_backend() == 'gpu', jax.devices(); assert torch.cuda.is_available()"
  BENCH_CONFIGS="gpt2_125m,gpt2_350m,llama_1b"
  BENCH_ARGS=(--steps=5 --repeats=3 --warmup=2 --fit_batch)
  TORCH_CONFIG="gpt2_125m"
  TORCH_ARGS=(--device=cuda --autocast_bf16 --warmup=3 --steps=5 --repeats=3 --eval_batches=4)
  LIMIT_S=330
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The torch shapes have no decode or depth runs; real data is exercised by the comparison, not the bench.
timeout "$LIMIT_S" "$PY" -m llm_jax.bench --configs="$BENCH_CONFIGS" "${BENCH_ARGS[@]}" --real_data=False \
  --decode=False --workdir="$WORK" --json="$WORK/bench.json"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$LIMIT_S" "$PY" tools/compare_torch.py \
  --configs="$TORCH_CONFIG" "${TORCH_ARGS[@]}" --workdir="$WORK" --json="$WORK/torch.json"

"$PY" - "$WORK/bench.json" "$WORK/torch.json" "$OUT" <<'PYEOF'
import json, sys
bench, torch_compare, out = sys.argv[1:]
with open(bench) as b, open(torch_compare) as t:
  merged = {"bench": json.load(b), "torch_compare": json.load(t)}
with open(out, "w") as f:
  json.dump(merged, f, indent=2)
print(f"wrote {out}")
PYEOF
