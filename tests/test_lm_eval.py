"""Tests for the lm-eval-harness backend: log-likelihoods against the zero-shot scorer and a float64 forward pass,
rolling windows against lm_eval's own windowing, generation against the sampler, and the command line."""

import dataclasses
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSONL only: never wait on the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tiny_hf  # noqa: E402
from conftest import REPO  # noqa: E402
from conftest import raises_one_line  # noqa: E402

from llm_jax import config as config_lib  # noqa: E402
from llm_jax import errors  # noqa: E402
from llm_jax import paths
from llm_jax import sampling  # noqa: E402
from llm_jax import tokenizer  # noqa: E402
from llm_jax import trainer  # noqa: E402
from llm_jax import workdir as workdir_lib  # noqa: E402
from llm_jax import writers  # noqa: E402
from llm_jax.checkpoint import Checkpointer  # noqa: E402
from llm_jax.evals import documents as doc_eval  # noqa: E402
from llm_jax.evals import harness  # noqa: E402
from llm_jax.evals import scoring  # noqa: E402
from llm_jax.model import Transformer  # noqa: E402
from llm_jax.model_config import ModelConfig  # noqa: E402

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e .[eval] or "
                              "-r requirements-test.txt)")
from lm_eval.tasks import TaskManager  # noqa: E402  pylint: disable=wrong-import-position

CFG = ModelConfig(family="gpt2", vocab_size=400, num_layers=2, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                  d_ff=64, max_len=64)
TASKS = os.path.join(REPO, "tests", "data", "lm_eval")
MC_FILE = os.path.join(TASKS, "tiny_mc.jsonl")


def write_workdir(workdir: str, cfg: ModelConfig = CFG, scale: float = 5.0) -> str:
  """A workdir as training leaves it (checkpoint, model card, tokenizer), parameters sharpened by `scale`."""
  tok = tokenizer.train_tokenizer(tiny_hf.TEXTS, os.path.join(workdir, "tokenizer", "spm"), model_type="bpe",
                                  vocab_size=cfg.vocab_size)
  params = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  params = jax.tree.map(lambda x: x * scale, params)
  ckpt = Checkpointer(workdir_lib.checkpoint_dir(workdir), keep=1, async_save=False)
  ckpt.save_params(3, params, {"model": dataclasses.asdict(cfg), "tokenizer_sha256": paths.file_sha256(tok.path)})
  ckpt.close()
  workdir_lib.write_model_card(workdir, cfg, tok.path)
  return workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return write_workdir(str(tmp_path_factory.mktemp("lm_eval") / "run"))


@pytest.fixture(scope="module")
def backend(workdir):
  return harness.load_backend(workdir, batch_size=3)


@jax.jit
def _logits(params, inputs_1xL):
  return Transformer(CFG).apply({"params": params}, inputs_1xL)[0][0]


def _log_probs(backend, ids: list[int]) -> np.ndarray:
  """float64 log-softmax of one forward pass over ids[:-1]: row i is the distribution of ids[i + 1].

  Inputs are right-padded to the model's positions (causal: padding after a position never changes it), so one
  compiled program serves every length.
  """
  n = len(ids) - 1
  padded = np.zeros((1, CFG.max_len), np.int32)
  padded[0, :n] = ids[:-1]
  logits = np.asarray(_logits(backend.params, jnp.asarray(padded)), np.float64)[:n]
  top = logits.max(axis=-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def test_harness_loglikelihoods_equal_the_zero_shot_scorer(workdir, monkeypatch):
  monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository root
  harness.register()
  manager = TaskManager(include_path=TASKS, include_defaults=False)  # indexing lm_eval's own tasks takes 20 s
  results = lm_eval.simple_evaluate(model="llm_jax", model_args=f"workdir={workdir},step=3", tasks=["llm_jax_tiny_mc"],
                                    task_manager=manager, batch_size=2, bootstrap_iters=0, log_samples=True)
  loaded = workdir_lib.load_model(workdir)
  items = scoring.read_items(MC_FILE)
  ours = scoring.zero_shot(loaded.params, loaded.cfg, loaded.tokenizer, items)
  samples = sorted(results["samples"]["llm_jax_tiny_mc"], key=lambda s: s["doc_id"])
  assert len(samples) == len(items) == 5
  for sample, expected in zip(samples, ours.log_likelihoods):
    got = [resp[0][0] for resp in sample["resps"]]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  assert results["results"]["llm_jax_tiny_mc"]["acc,none"] == pytest.approx(ours.accuracy)
  assert len({round(x, 3) for ll in ours.log_likelihoods for x in ll}) > 5  # the scores really differ


def _greedy_pair(backend) -> tuple[str, str]:
  """A context and the text of the model's argmax next token, chosen so that it tokenises back to that token."""
  tok = backend.tokenizer
  for text in tiny_hf.TEXTS[:20]:
    context = text[:40].rstrip()
    greedy_id = int(np.argmax(_log_probs(backend, [scoring.conditioning_id(tok)] + tok.encode(context) + [0])[-1]))
    continuation = tok.decode(tok.encode(context) + [greedy_id])[len(context):]
    if continuation and scoring.encode_pair(tok, context, continuation)[1] == [greedy_id]:
      return context, continuation
  raise AssertionError("no context whose greedy next token round-trips through the tokenizer")


def test_loglikelihood_and_greedy_flag_by_definition(backend):
  tok = backend.tokenizer
  context, greedy = _greedy_pair(backend)
  pairs = [(context, " to values."), (context, greedy),
           ("", "Hello there"), ("x " * 80, " long")]  # the last context is cut to the model's 64 positions
  got = backend.loglikelihood(pairs)
  for (ctx, cont), (ll, is_greedy) in zip(pairs, got):
    context_ids, cont_ids = scoring.encode_pair(tok, ctx, cont)
    ids = ([scoring.conditioning_id(tok)] + context_ids + cont_ids)[-(CFG.max_len + 1):]
    lp = _log_probs(backend, ids)[-len(cont_ids):]
    targets = ids[-len(cont_ids):]
    assert ll == pytest.approx(sum(lp[i, t] for i, t in enumerate(targets)), abs=1e-4)
    assert is_greedy == all(int(np.argmax(lp[i])) == t for i, t in enumerate(targets))
  assert got[1][1], "a continuation of the argmax token is greedy"
  assert not got[0][1]


def test_loglikelihood_rolling_matches_lm_evals_own_windows(backend):
  tok = backend.tokenizer
  texts = [tiny_hf.TEXTS[3][:1500], "Short text.", ""]
  got = backend.loglikelihood_rolling(texts)
  for text, value in zip(texts, got):
    ids = tok.encode(text)
    expected = 0.0
    windows = lm_eval.utils.get_rolling_token_windows(ids, scoring.conditioning_id(tok), CFG.max_len, 1)
    for context, targets in map(lm_eval.utils.make_disjoint_window, windows):
      lp = _log_probs(backend, context + targets)[-len(targets):]
      expected += sum(lp[i, t] for i, t in enumerate(targets))
    assert value == pytest.approx(expected, abs=1e-3)
  assert len(tok.encode(texts[0])) > 3 * CFG.max_len  # several windows, the last one overlapping
  assert got[2] == 0.0


def test_generate_until_is_the_greedy_sampler_cut_at_the_stop_string(backend):
  tok = backend.tokenizer
  context = "The assignment statement"
  length = 1 + len(tok.encode(context)) + 12  # BOS, the prompt and 12 new tokens
  full = sampling.generate_texts(backend.params, backend.cfg, tok, context, max_length=length, num_return_sequences=1,
                                 temperature=0.0, top_k=0, top_p=1.0, seed=0)[0]
  continuation = full[len(context):]
  assert len(continuation.strip()) > 2
  stop = continuation.strip()[1:3]
  got = backend.generate_until([(context, {"max_gen_toks": 12}), (context, {"until": [stop], "max_gen_toks": 12}),
                                (context, {"until": "\n", "max_gen_toks": 12, "do_sample": False})])
  assert got[0] == continuation
  assert got[1] == continuation[:continuation.index(stop)] and len(got[1]) < len(got[0])
  assert got[2] == continuation.split("\n")[0]
  with raises_one_line(errors.ConfigError, "generate_until request 0", "['repetition_penalty']"):
    backend.generate_until([(context, {"repetition_penalty": 1.1})])


def test_bad_model_args_are_one_line_errors(workdir):
  cls = harness.lm_class()
  with raises_one_line(errors.ConfigError, "--model_args workdir=DIR"):
    cls()
  with raises_one_line(errors.ConfigError, "--batch_size=auto", "fixed integer"):
    cls(workdir=workdir, batch_size="auto")
  with raises_one_line(errors.MissingFileError, workdir + "_missing", "does not exist"):
    cls(workdir=workdir + "_missing")


@pytest.mark.slow
def test_harness_tasks_and_zero_shot_files_run_every_k_steps_during_training(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  c = config_lib.from_file(os.path.join(REPO, "experiments", "smoke.py"))
  c.num_train_steps, c.eval_every, c.extra_eval_every, c.sample.max_length = 10, 10, 4, 20
  c.eval_harness_tasks, c.eval_harness_include_path, c.eval_zero_shot_files = "llm_jax_tiny_mc", TASKS, MC_FILE
  trainer.train_and_evaluate(config_lib.resolve(c), str(tmp_path / "run"))
  records = writers.read_metrics(str(tmp_path / "run"))
  extra = {r["step"]: r for r in records if "harness/llm_jax_tiny_mc/acc" in r}
  assert sorted(extra) == [4, 8, 10]  # every 4 steps and at the end, not with the step-10 validation pass as well
  assert [r["step"] for r in records if "val_loss" in r] == [10]
  assert all("harness/llm_jax_tiny_mc/acc" not in r for r in records if "val_loss" in r)
  for r in extra.values():  # the same items through the harness and through the zero-shot scorer
    assert r["harness/llm_jax_tiny_mc/acc"] == r["zero_shot/tiny_mc/accuracy"]
  zero_shot = doc_eval.zero_shot_workdir(str(tmp_path / "run"), MC_FILE, step=10)
  assert extra[10]["zero_shot/tiny_mc/accuracy"] == zero_shot["accuracy"]


@pytest.mark.slow
def test_command_line_runs_the_registered_model(workdir, cli):
  out = cli("llm_jax.harness", "--model", "llm_jax", "--model_args", f"workdir={workdir}", "--tasks",
            "llm_jax_tiny_mc", "--include_path", TASKS, "--batch_size", "4", "--limit", "2", devices=1,
            env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert "llm_jax_tiny_mc" in out.stdout and "acc" in out.stdout
