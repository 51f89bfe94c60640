"""Test set-up: 8 simulated CPU devices (so every run exercises sharding) and a warm compile cache."""

import os

# Must happen before the first `import jax` anywhere in the test session.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  pylint: disable=wrong-import-position

jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/llm_jax/jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
# The command-line tests' child processes share that cache (JAX reads its options from these variables): most of
# them compile the same smoke step, which then costs one compile per test session instead of one per child.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/llm_jax/jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module: str, *args: str, devices: int = 8, env: dict | None = None, timeout: int = 600,
               process_env: dict | None = None) -> subprocess.CompletedProcess:
  """Runs `python -m <module> <args>` in a fresh process with `devices` simulated CPU devices."""
  full_env = {**os.environ, **(env or {})}
  full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  full_env["JAX_PLATFORMS"] = "cpu"
  full_env.update(process_env or {})
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env, capture_output=True,
                        text=True, timeout=timeout, check=False)


@pytest.fixture(name="cli")
def cli_fixture():
  return run_module


@pytest.fixture(name="pretrained", scope="session")
def pretrained_fixture(tmp_path_factory):
  """A tiny GPT-2 trained 10 steps on the built-in corpus: the base that SFT and LoRA tests fine-tune."""
  from llm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from llm_jax import trainer  # pylint: disable=import-outside-toplevel

  c = config_lib.from_file(os.path.join(REPO, "experiments", "smoke.py"))
  c.num_train_steps, c.eval_every, c.checkpoint_every = 10, 10, 10
  c.sample.max_length, c.sample.num_return_sequences = 20, 1
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  trainer.train_and_evaluate(c, workdir)
  return workdir


@pytest.fixture(name="smoke_20", scope="session")
def smoke_20_fixture(tmp_path_factory):
  """The smoke config trained 20 steps straight through: the reference run that resumed and multi-process runs match.

  Shared by tests/test_train.py, test_trainer_loop.py and test_distributed.py; tests read it and never write to it.
  """
  from test_train import smoke_config  # pylint: disable=import-outside-toplevel

  from llm_jax import trainer  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path_factory.mktemp("smoke_20"))
  trainer.train_and_evaluate(smoke_config(num_train_steps=20), workdir)
  return workdir
