"""The `blas_gemm` XLA FFI target (experiments/blas_gemm.cc): built with the host's g++ against numpy's OpenBLAS on
first use, cached by source and library, registered with JAX; `gemm(a, b, trans_a, trans_b)` calls it (CPU only)."""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "blas_gemm.cc")
TARGET = "blas_gemm"


def _openblas() -> str:
  """numpy's bundled OpenBLAS (the library that experiments report as the BLAS peak)."""
  libs = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs",
                                       "libscipy_openblas64_*.so")))
  if not libs:
    raise RuntimeError("numpy ships no scipy_openblas64_ library here (a numpy wheel built against another BLAS); "
                       "the blas_gemm prototype needs numpy's OpenBLAS")
  return libs[0]


def build(cache_dir: str = os.path.expanduser("~/.cache/llm_jax/ffi")) -> str:
  """Compiles blas_gemm.cc into `cache_dir` unless the same source, JAX and OpenBLAS built it before; the .so path."""
  blas = _openblas()
  with open(SOURCE, "rb") as f:
    key = hashlib.sha256(f.read() + f"{jax.__version__}|{blas}".encode()).hexdigest()[:16]
  library = os.path.join(cache_dir, f"libblas_gemm_{key}.so")
  if os.path.exists(library):
    return library
  compiler = shutil.which(os.environ.get("CXX", "g++"))
  if compiler is None:
    raise RuntimeError("the blas_gemm prototype compiles C++ and no g++ is on PATH (or set CXX)")
  os.makedirs(cache_dir, exist_ok=True)
  partial = f"{library}.{os.getpid()}.tmp"
  command = [compiler, "-O2", "-shared", "-fPIC", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}", SOURCE, "-o",
             partial, blas, f"-Wl,-rpath,{os.path.dirname(blas)}"]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"compiling {SOURCE} failed: {result.stderr.strip().splitlines()[-1:]}")
  os.replace(partial, library)  # a concurrent builder sees no library or a whole one
  return library


@functools.cache
def register() -> None:
  """Builds (if needed) and registers the FFI target once per process."""
  library = ctypes.cdll.LoadLibrary(build())
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.BlasGemm), platform="cpu")


def gemm(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """op(a) · op(b) for 2-D float32 operands, op = transpose where asked; the transposes cost no copy."""
  register()
  m = a.shape[1] if trans_a else a.shape[0]
  n = b.shape[0] if trans_b else b.shape[1]
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))
  return call(a.astype(jnp.float32), b.astype(jnp.float32), trans_a=np.int64(trans_a),
              trans_b=np.int64(trans_b))
