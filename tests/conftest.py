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

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pydoc_data.topics import topics  # noqa: E402

import pytest  # noqa: E402
from tensorboardX.proto import event_pb2  # noqa: E402

from llm_jax import checkpoint as checkpoint_lib  # noqa: E402
from llm_jax import config as config_lib  # noqa: E402
from llm_jax import workdir as workdir_lib  # noqa: E402
from llm_jax import writers  # noqa: E402
from llm_jax.data.text import clean_text  # noqa: E402

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
  trainer.train_and_evaluate(config_lib.resolve(c), workdir)
  return workdir


@pytest.fixture(name="smoke_20", scope="session")
def smoke_20_fixture(tmp_path_factory):
  """The smoke config trained 20 steps straight through: the reference run that resumed and multi-process runs match.

  Shared by tests/test_train.py, test_trainer_loop.py and test_distributed.py; tests read it and never write to it.
  """
  from llm_jax import trainer  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path_factory.mktemp("smoke_20"))
  trainer.train_and_evaluate(config_lib.resolve(smoke_config(num_train_steps=20)), workdir)
  return workdir


# Helpers the test files share (one place, so that no test file imports another).

def load_experiment(path: str, variant: str | None = None):
  spec = importlib.util.spec_from_file_location("experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def smoke_config(**overrides):
  c = load_experiment(os.path.join(REPO, "experiments", "smoke.py"))
  c.sample.max_length = 20
  c.update(overrides)
  return c


def restored_params(workdir: str, step: int):
  ckpt = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir), keep=100, async_save=False)
  try:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _abstract_state(workdir))
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    _, params = ckpt.restore_params(abstract, shardings, step)
    return jax.device_get(params)
  finally:
    ckpt.close()


def _abstract_state(workdir: str):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  from llm_jax.model import abstract_params  # pylint: disable=import-outside-toplevel
  cfg, _ = workdir_lib.read_model_card(workdir)
  return nn.unbox(abstract_params(cfg))


def losses(workdir: str) -> list[tuple[int, float]]:
  return [(r["step"], r["loss"]) for r in writers.read_metrics(workdir) if "loss" in r]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def tensorboard_events(path: str):
  """The Event protos of one event file (TFRecord framing: 8-byte length, 4-byte crc, data, 4-byte crc)."""
  with open(path, "rb") as f:
    data = f.read()
  offset = 0
  while offset + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    payload = data[offset + 12:offset + 12 + length]
    if len(payload) < length:
      break  # a record cut short by a kill
    offset += 12 + length + 4
    event = event_pb2.Event()
    event.ParseFromString(payload)
    yield event


def sft_config(pretrained, sft_files, **overrides):
  c = config_lib.from_file(os.path.join(REPO, "experiments", "smoke.py"))
  c.data.corpus, c.data.sft_files, c.data.validation_fraction = "sft", sft_files, 0.2
  c.init_params_from, c.num_train_steps, c.eval_every, c.checkpoint_every = pretrained, 12, 12, 12
  c.optim.warmup_steps, c.sample.max_length, c.sample.num_return_sequences = 2, 20, 1
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


@pytest.fixture(name="sft_rows", scope="session")
def sft_rows_fixture(tmp_path_factory):
  path = tmp_path_factory.mktemp("sft") / "rows.jsonl"
  path.write_text("".join(json.dumps(row) + "\n" for row in SFT_ROWS * 20))
  return str(path)


# SFT rows short enough for the tiny model's 64 positions.
SFT_ROWS = [{"prompt": "Which year was it given? ", "completion": "1790"},
        {"messages": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Adams"}]},
        {"prompt": "Say: ", "completion": "the state of the union is strong"}]

TOPICS = [clean_text(text) for _, text in sorted(topics.items())]
TOPICS = [t for t in TOPICS if t]


# Error-message checks: a test names the error's kind, the offending key, flag, path or value (and any number the code
# computes, or advice that is itself the behaviour under test) and that the message is one line; it does not pin the
# whole sentence, so rewording a message's advice breaks no test.

def assert_one_line(message: str, *fragments: str) -> None:
  """`message` is one non-empty line holding every one of `fragments`."""
  assert message.strip() and "\n" not in message, f"not one line: {message!r}"
  missing = [f for f in fragments if f not in message]
  assert not missing, f"{missing} not in {message!r}"


@contextlib.contextmanager
def raises_one_line(kind: type[BaseException], *fragments: str):
  """`pytest.raises(kind)` whose message is one line holding every one of `fragments`; yields the ExceptionInfo."""
  with pytest.raises(kind) as caught:
    yield caught
  assert_one_line(str(caught.value), *fragments)


def assert_cli_error(result: subprocess.CompletedProcess, program: str, *fragments: str) -> str:
  """A command-line program's refusal: exit status 2 and exactly one stderr line, `llm_jax.<program>: error: ...`,
  holding every one of `fragments`; returns that line."""
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-2000:]
  assert lines[0].startswith(f"llm_jax.{program}: error: "), lines[0]
  assert_one_line(lines[0], *fragments)
  return lines[0]


def signal_at(monkeypatch, step: int, *signums: int) -> None:
  """Makes the data pipeline deliver `signums` to this process while producing the batch of `step`."""
  from llm_jax.data import pipeline  # pylint: disable=import-outside-toplevel

  make = pipeline.make_train_iterator

  class Signalling:
    def __init__(self, inner):
      self.inner, self.step = inner, 0

    def __next__(self):
      self.step += 1
      if self.step == step:
        for signum in signums:
          os.kill(os.getpid(), signum)
      return next(self.inner)

    def get_state(self):
      return self.inner.get_state()

    def set_state(self, state):
      self.inner.set_state(state)
      self.step = state["next_index"]

  monkeypatch.setattr(pipeline, "make_train_iterator", lambda *a, **k: Signalling(make(*a, **k)))
