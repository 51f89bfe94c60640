"""The lm-evaluation-harness backend: our model answering the harness's three request types, registered as `llm_jax`.

`Backend` holds parameters, model config and tokenizer and needs nothing from lm_eval:
- loglikelihood (context, continuation): log P(continuation | context) and whether greedy decoding would produce
  it, tokenised and laid out exactly as the zero-shot scorer does (`scoring.encode_pair`, a conditioning token
  first, the oldest context tokens dropped past the model's positions), scored in batches of similar lengths;
- loglikelihood_rolling (text): the summed log-likelihood of every token of the text once, in windows of the
  model's positions where the last window keeps a full context (`documents.document_windows`);
- generate_until (context, gen_kwargs): the KV-cached sampler (`sampling.generate`, greedy unless do_sample),
  stopping at EOS or max_gen_toks and cut at the first stop string of `until`. The sampler decodes one prompt
  at a time (distinct prompts would need padding masks), so generation is batched only across scoring.
`lm_class()` imports lm_eval (the optional `eval` extra) and wraps a Backend in its `LM` interface; `register()`
adds it to lm_eval's model registry under MODEL_NAME, which `python -m llm_jax.harness` does before handing
its arguments to lm_eval's own command line.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any
from typing import Sequence

import numpy as np

from llm_jax import errors
from llm_jax import sampling
from llm_jax import workdir as workdir_lib
from llm_jax.evals import documents
from llm_jax.evals import scoring
from llm_jax.model_config import ModelConfig

MODEL_NAME = "llm_jax"
INSTALL_HINT = "install the eval extra: pip install -e .[eval] (lm-eval==0.4.13)"
# Generation keyword arguments the backend reads; any other is refused rather than silently ignored.
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def require_lm_eval(what: str) -> None:
  """A one-line error naming the extra to install when lm_eval is missing."""
  if importlib.util.find_spec("lm_eval") is None:
    raise errors.ConfigError(f"{what} needs lm_eval, which is not installed; {INSTALL_HINT}")


class Backend:
  """Log-likelihoods and generations of one model; `params` may be replaced between calls (training-time eval)."""

  def __init__(self, params: Any, cfg: ModelConfig, tokenizer: Any, *, batch_size: int = 8,
               max_gen_toks: int = 256, seed: int = 0):
    if batch_size < 1:
      raise errors.ConfigError(f"batch_size={batch_size} must be at least 1")
    if max_gen_toks < 1:
      raise errors.ConfigError(f"max_gen_toks={max_gen_toks} must be at least 1")
    self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
    self.batch_size, self.max_gen_toks, self.seed = batch_size, max_gen_toks, seed

  def score_sequences(self, sequences: Sequence[tuple[Sequence[int], int]]) -> dict[str, np.ndarray]:
    """Per (tokens, number of final targets scored): summed NLL, targets, argmax hits; in the order given.

    Sequences are sorted by length and each batch is padded to its own multiple of LENGTH_QUANTUM, so a few
    compiled programs serve every request and short requests do not pay for the longest.
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    out = {k: np.zeros(len(sequences), np.float64) for k in ("nll", "tokens", "correct")}
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      longest = len(sequences[chunk[0]][0]) - 1
      length = min(self.cfg.max_len, -(-longest // scoring.LENGTH_QUANTUM) * scoring.LENGTH_QUANTUM)
      rows = scoring.layout_rows([sequences[i] for i in chunk], length)
      scores = scoring.score_all(self.params, self.cfg, rows, self.batch_size)
      for k in out:
        out[k][chunk] = scores[k]
    return out

  def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(log P(continuation | context), is_greedy) per pair, as `scoring.make_choice_rows` lays choices out."""
    start_id, max_len = scoring.conditioning_id(self.tokenizer), self.cfg.max_len
    sequences = []
    for i, (context, continuation) in enumerate(pairs):
      sequences.append(scoring.choice_sequence(self.tokenizer, context, continuation, start_id, max_len,
                                               f"loglikelihood request {i}: the continuation {continuation!r}"))
    scores = self.score_sequences(sequences)
    return [(-float(nll), bool(hits == tokens)) for nll, hits, tokens in
            zip(scores["nll"], scores["correct"], scores["tokens"])]

  def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
    """Summed log-likelihood of each text's tokens, each scored once after the conditioning token."""
    start_id, window = scoring.conditioning_id(self.tokenizer), self.cfg.max_len
    sequences, owner = [], []
    for i, ids in enumerate(self.tokenizer.encode_batch(list(texts))):
      if ids:
        windows = documents.document_windows(ids, start_id, window, window)
        sequences += windows
        owner += [i] * len(windows)
    totals = np.zeros(len(texts), np.float64)
    if sequences:
      np.add.at(totals, owner, self.score_sequences(sequences)["nll"])
    return [-float(t) for t in totals]

  def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """The continuation of each context, up to EOS, max_gen_toks or the first stop string of `until`."""
    return [self._generate_one(context, dict(kwargs or {}), i) for i, (context, kwargs) in enumerate(requests)]

  def _generate_one(self, context: str, kwargs: dict[str, Any], index: int) -> str:
    unknown = sorted(set(kwargs) - set(GEN_KWARGS))
    if unknown:
      raise errors.ConfigError(f"generate_until request {index}: llm_jax does not support generation settings "
                               f"{unknown}; it reads {list(GEN_KWARGS)}")
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_gen_toks = int(kwargs.get("max_gen_toks", self.max_gen_toks))
    temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
    tok, limit = self.tokenizer, self.cfg.max_len
    prompt = ([tok.bos_id] if tok.bos_id >= 0 else []) + tok.encode(context)
    prompt = prompt[-max(1, limit - max_gen_toks):]  # the oldest context goes first, as in scoring
    row = sampling.generate(self.params, self.cfg, prompt, max_length=min(limit, len(prompt) + max_gen_toks),
                            temperature=temperature, top_k=int(kwargs.get("top_k", 0)),
                            top_p=float(kwargs.get("top_p", 1.0)), seed=self.seed, eos_id=tok.eos_id)[0]
    generated = [int(t) for t in row[len(prompt):]]
    if tok.eos_id in generated:
      generated = generated[:generated.index(tok.eos_id)]
    text = continuation_text(tok, prompt, generated)
    for stop in until:
      if stop and stop in text:
        text = text[:text.index(stop)]
    return text


def continuation_text(tok: Any, prompt: Sequence[int], generated: Sequence[int]) -> str:
  """The text `generated` adds after `prompt`: decoded in context, so a word-initial space is kept."""
  skip = 1 if prompt and prompt[0] == tok.bos_id else 0
  before = tok.decode(list(prompt[skip:]))
  whole = tok.decode(list(prompt[skip:]) + list(generated))
  return whole[len(before):] if whole.startswith(before) else tok.decode(list(generated))


def load_backend(workdir: str, step: int | None = None, **kwargs: Any) -> Backend:
  """A Backend over checkpoint `step` (default the newest) of a training or conversion workdir."""
  loaded = workdir_lib.load_model(workdir, step)
  return Backend(loaded.params, loaded.cfg, loaded.tokenizer, **kwargs)


@functools.cache
def lm_class() -> type:
  """lm_eval's `LM` interface over a Backend (imports lm_eval; built once)."""
  require_lm_eval("the lm-eval-harness backend")
  from lm_eval.api.model import LM  # pylint: disable=import-outside-toplevel

  class LlmJaxLM(LM):
    """`--model llm_jax --model_args workdir=DIR[,step=N][,max_gen_toks=K][,seed=S]`; --batch_size sets rows per
    forward pass. lm_eval's --device is accepted and unused: JAX places the model (set JAX_PLATFORMS)."""

    def __init__(self, workdir: str = "", step: int | None = None, batch_size: int | str = 8,
                 max_gen_toks: int = 256, seed: int = 0, backend: Backend | None = None,
                 device: str | None = None, max_batch_size: int | None = None):
      super().__init__()
      del device, max_batch_size  # lm_eval always passes them; JAX chooses the device, batches are fixed
      if str(batch_size).startswith("auto"):
        raise errors.ConfigError(f"--batch_size={batch_size}: llm_jax needs a fixed integer batch size")
      if backend is None:
        if not workdir:
          raise errors.ConfigError("--model llm_jax needs --model_args workdir=DIR (a training or conversion workdir)")
        backend = load_backend(str(workdir), None if step is None else int(step), batch_size=int(batch_size),
                               max_gen_toks=int(max_gen_toks), seed=int(seed))
      self.backend = backend

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
      return self.backend.loglikelihood([r.args for r in requests])

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
      return self.backend.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
      return self.backend.generate_until([r.args for r in requests])

  return LlmJaxLM


def register() -> type:
  """Adds the backend to lm_eval's model registry as MODEL_NAME (idempotent); returns the class."""
  cls = lm_class()
  # lm_eval fills its registry with the built-in models only while the registry is empty: fill it first.
  import lm_eval.models  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  from lm_eval.api.registry import model_registry  # pylint: disable=import-outside-toplevel
  model_registry.register(MODEL_NAME, target=cls)  # registering the same class again is a no-op
  return cls


def flat_results(results: dict[str, Any]) -> dict[str, float]:
  """'harness/<task>/<metric>' for each numeric metric of lm_eval's results (filter 'none' left out of the name)."""
  out = {}
  for task, metrics in results["results"].items():
    for key, value in metrics.items():
      metric, _, filter_name = key.partition(",")
      if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in metric:
        name = metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
        out[f"harness/{task}/{name}"] = float(value)
  return out


class HarnessTasks:
  """lm-eval tasks indexed once and run on whatever parameters they are called with (single process).

  `tasks` are lm_eval task names, found among its built-in tasks and the YAML files under `include_path`;
  `limit` caps the items per task (0: all). Calling it returns `flat_results` of one evaluation.
  """

  def __init__(self, backend: Backend, tasks: Sequence[str], *, include_path: str = "", limit: int = 0):
    require_lm_eval("eval_harness_tasks")
    from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
    # Indexing lm_eval's own thousands of tasks takes about 20 s: skip it when include_path has them all.
    self.manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if self.manager is None or set(tasks) - set(self.manager.all_tasks):
      self.manager = TaskManager(include_path=include_path or None)
    missing = sorted(set(tasks) - set(self.manager.all_tasks))
    if missing:
      raise errors.ConfigError(f"eval_harness_tasks names {missing}, which lm_eval does not know"
                               f"{' under ' + include_path if include_path else ''}; check the names or set "
                               "eval_harness_include_path to the folder of their YAML files")
    self.backend, self.tasks, self.limit = backend, list(tasks), limit
    self.lm = lm_class()(backend=backend)

  def __call__(self, params: Any) -> dict[str, float]:
    import lm_eval  # pylint: disable=import-outside-toplevel
    self.backend.params = params
    results = lm_eval.simple_evaluate(model=self.lm, tasks=self.tasks, task_manager=self.manager,
                                      limit=self.limit or None, bootstrap_iters=0, log_samples=False)
    return flat_results(results)
