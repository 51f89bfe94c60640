"""Test set-up: 8 simulated CPU devices (so every run exercises sharding) and a warm compile cache."""

import os

# Must happen before the first `import jax` anywhere in the test session.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  pylint: disable=wrong-import-position

jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/llm_jax/jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
