"""Tests for `llm_jax.inspect` and `llm_jax.interp`: losses against llm_jax.evaluate, attention probabilities against
the mask's rules and the model's own output, the logit lens against the model's prediction, and the files written."""

import dataclasses
import functools
import html.parser
import json
import os
from pydoc_data.topics import topics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_cli_error
from conftest import raises_one_line
from PIL import Image

from llm_jax import errors
from llm_jax import workdir as workdir_lib
from llm_jax.evals import documents as doc_eval
from llm_jax.interp import analysis
from llm_jax.interp import report
from llm_jax.model import Transformer
from llm_jax.model_config import ModelConfig

TEXT = " ".join(topics["assert"].split())  # about 1,800 characters of English prose, cleaned
SHORT = "The state of the Union is strong.\nWe have work to do."

TINY = {
    "gpt2": ModelConfig(vocab_size=64, num_layers=3, d_model=32, num_heads=4, num_kv_heads=4, head_dim=8, d_ff=64,
                        max_len=32),
    "llama": ModelConfig(family="llama", vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                         head_dim=8, d_ff=64, max_len=32, tie_embeddings=False, logit_softcap=5.0),
}


capture = jax.jit(analysis.capture, static_argnums=1)
lens = jax.jit(analysis.lens, static_argnums=1)


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg: ModelConfig, params, *inputs):
  return Transformer(cfg).apply({"params": params}, *inputs)[0]


def _random(cfg: ModelConfig, seed: int = 0):
  return nn.unbox(Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


@pytest.fixture(name="loaded", scope="module")
def loaded_fixture(pretrained):
  return workdir_lib.load_model(pretrained)


@pytest.mark.slow
@pytest.mark.parametrize("seq_len,stride", [(64, 0), (64, 16), (48, 48)])
def test_token_losses_sum_to_the_evaluate_figure(loaded, seq_len, stride):
  text = SHORT if stride == 0 else TEXT
  ins = analysis.inspect_text(loaded.params, loaded.cfg, loaded.tokenizer, text, seq_len=seq_len, stride=stride)
  ev = doc_eval.evaluate_documents(loaded.params, loaded.cfg, loaded.tokenizer, [text], seq_len=seq_len,
                                   stride=stride, batch_size=4)
  assert len(ins.nll) == ev["tokens"] == len(loaded.tokenizer.encode(text))
  assert abs(ins.mean_loss - ev["doc_loss"]) < 1e-5
  assert abs(ins.bits_per_byte - ev["bits_per_byte"]) < 1e-5
  assert "".join(ins.pieces) == loaded.tokenizer.decode(ins.ids) == text
  # The top-5 are sorted probabilities, and the top-1 hits the target as often as evaluate's accuracy says.
  assert np.all(np.diff(ins.top_probs, axis=1) <= 0) and np.all(ins.top_probs.sum(1) <= 1 + 1e-5)
  assert abs(float(np.mean(ins.top_ids[:, 0] == ins.ids)) - ev["accuracy"]) < 1e-9


@pytest.mark.parametrize("family,scan,impl", [("gpt2", True, "einsum"), ("gpt2", False, "einsum"),
                                              ("llama", True, "jax")])
def test_attention_rows_sum_to_one_and_stay_causal_within_documents(family, scan, impl):
  # Captured from the model as configured (remat 'auto', any attention_impl): it switches to the reference path itself.
  cfg = dataclasses.replace(TINY[family], scan_layers=scan, attention_impl=impl)
  params = _random(cfg)
  segments_BxL = jnp.asarray([[1] * 9 + [2] * 11 + [0] * 4])  # two packed documents, then padding
  positions_BxL = jnp.asarray([list(range(9)) + list(range(11)) + [0] * 4])
  tokens_BxL = jax.random.randint(jax.random.key(1), (1, 24), 0, cfg.vocab_size)
  c = capture(params, cfg, tokens_BxL, positions_BxL, segments_BxL)
  probs = np.asarray(c.probs_NxBxHxLxS)[:, 0]
  assert probs.shape == (cfg.num_layers, cfg.num_heads, 24, 24)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  q, k = np.arange(24)[:, None], np.arange(24)[None, :]
  seg = np.asarray(segments_BxL[0])
  allowed = (k <= q) & (seg[:, None] == seg[None, :])
  assert np.all(probs[..., ~allowed] == 0.0)
  assert np.all(probs[..., allowed] > 0.0)
  # The probabilities are those the output is made of: the inspected forward gives the model's usual logits (for
  # 'jax', those of XLA's attention, a second implementation).
  logits = _logits(cfg, params, tokens_BxL, positions_BxL, segments_BxL)
  np.testing.assert_allclose(np.asarray(c.logits_BxLxV), np.asarray(logits), atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lens_at_the_last_layer_is_the_models_prediction(family):
  cfg = TINY[family]
  params = _random(cfg, seed=2)
  tokens_BxL = jax.random.randint(jax.random.key(3), (2, 16), 0, cfg.vocab_size)
  c = capture(params, analysis.reference_config(cfg), tokens_BxL)
  ids_MxBxL, probs_MxBxL = lens(params, cfg, c.residual_MxBxLxD)
  assert ids_MxBxL.shape == (cfg.num_layers + 1, 2, 16)
  logits = _logits(cfg, params, tokens_BxL)
  np.testing.assert_array_equal(np.asarray(ids_MxBxL[-1]), np.asarray(jnp.argmax(logits, -1)))
  np.testing.assert_allclose(np.asarray(probs_MxBxL[-1]), np.asarray(jax.nn.softmax(logits).max(-1)), atol=1e-6)


def test_head_statistics_by_formula():
  # Two heads over 3 queries: one all on the first key, one all on the previous key (query 0 on itself).
  first = np.zeros((3, 3))
  first[:, 0] = 1
  previous = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]], float)
  probs = jnp.asarray(np.stack([first, previous])[None, None])  # N=1, B=1, H=2
  sums = analysis.head_sums(probs, jnp.asarray([[0.0, 1.0, 1.0]]))
  heads = {k: np.asarray(v) / float(sums["count"]) for k, v in sums.items() if k != "count"}
  np.testing.assert_allclose(heads["first"], [[1.0, 0.5]])
  np.testing.assert_allclose(heads["previous"], [[0.5, 1.0]])
  np.testing.assert_allclose(heads["distance"], [[1.5, 1.0]])
  np.testing.assert_allclose(heads["local"], [[1.0, 1.0]])
  np.testing.assert_allclose(heads["entropy"], [[0.0, 0.0]], atol=1e-6)
  np.testing.assert_allclose(heads["uniform_entropy"], [[(np.log(2) + np.log(3)) / 2] * 2], rtol=1e-6)
  kinds = [r["kind"] for r in analysis.head_table(heads)]
  assert kinds == ["first-token", "previous-token"]


class _Page(html.parser.HTMLParser):
  """Counts token spans and collects their hover titles; fails on unbalanced tags."""

  def __init__(self):
    super().__init__()
    self.titles, self.stack, self.images = [], [], []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag in ("meta", "img"):
      self.images += [attrs["src"]] if tag == "img" else []
      return
    self.stack.append(tag)
    if tag == "span" and attrs.get("class") == "tok":
      self.titles.append(attrs["title"])

  def handle_endtag(self, tag):
    assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


def _check_png(path: str, min_w: int = 200, min_h: int = 60):
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == "PNG" and image.size[0] >= min_w and image.size[1] >= min_h, image.size


def _check_page(path: str, num_tokens: int) -> _Page:
  parser = _Page()
  with open(path, encoding="utf-8") as f:
    parser.feed(f.read())
  parser.close()
  assert not parser.stack and len(parser.titles) == num_tokens
  for src in parser.images:
    assert os.path.isfile(os.path.join(os.path.dirname(path), src))
  return parser


@pytest.mark.slow
def test_every_file_is_a_valid_png_or_page(loaded, pretrained, tmp_path):
  ins = analysis.inspect_text(loaded.params, loaded.cfg, loaded.tokenizer, TEXT, seq_len=64, stride=32)
  summary = report.write_inspection(str(tmp_path), ins, loaded.tokenizer, {"workdir": pretrained,
                                                                          "checkpoint_step": loaded.step})
  compared = report.write_comparison(str(tmp_path), ins, ins, "a", "b", top=5)
  report.write_summary(str(tmp_path), {**summary, "compare": compared})
  files = [*summary["files"], *compared["files"]]
  assert sorted(files) == sorted(os.listdir(tmp_path))
  assert sum(f.startswith("attention_layer") for f in files) == loaded.cfg.num_layers
  for name in files:
    if name.endswith(".png"):
      _check_png(str(tmp_path / name))
  page = _check_page(str(tmp_path / report.TOKENS_HTML), len(ins.ids))
  assert f"{ins.nll[3]:.4f}" in page.titles[3] and page.titles[3].count("\n") == 1 + analysis.TOP_K
  _check_page(str(tmp_path / report.COMPARE_HTML), len(ins.ids))
  with open(tmp_path / report.SUMMARY_JSON) as f:
    written = json.load(f)
  assert written["mean_loss"] == pytest.approx(ins.mean_loss) and len(written["per_token"]) == len(ins.ids)
  assert len(written["heads"]) == loaded.cfg.num_layers * loaded.cfg.num_heads
  # The compare of a model with itself: every difference zero.
  assert compared["mean_difference"] == 0 and all(d["difference"] == 0 for d in compared["largest"])


def test_largest_differences_come_first():
  assert analysis.largest_differences(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.5, 0.0, 3.0, 4.1]), 2) == [1, 0]


@pytest.mark.parametrize("text,num_ids,stride,kind,fragments", [
    (" \n", 0, 0, errors.DataError, ("empty", "--text")),
    ("x" * 10, 200, 0, errors.ConfigError, ("200 tokens", "--seq_len=64", "--stride=32")),
    ("x", 1, 100, errors.ConfigError, ("--stride=100", "--seq_len=64"))])
def test_bad_text_is_one_line(text, num_ids, stride, kind, fragments):
  with raises_one_line(kind, *fragments):
    analysis.check_text(text, num_ids, 64, stride)


@pytest.mark.slow  # builds a transformers model and converts it: about 20 s
def test_a_converted_hugging_face_gpt2(tmp_path):
  pytest.importorskip("transformers")
  import tiny_hf  # pylint: disable=import-outside-toplevel

  from llm_jax.hf import files as hf_files  # pylint: disable=import-outside-toplevel

  tiny_hf.gpt2_dir(str(tmp_path / "hf"))
  hf_files.import_hf(str(tmp_path / "hf"), str(tmp_path / "wd"))
  loaded = workdir_lib.load_model(str(tmp_path / "wd"))
  ins = analysis.inspect_text(loaded.params, loaded.cfg, loaded.tokenizer, SHORT, seq_len=64)
  ev = doc_eval.evaluate_documents(loaded.params, loaded.cfg, loaded.tokenizer, [SHORT], seq_len=64)
  assert abs(ins.mean_loss - ev["doc_loss"]) < 1e-5
  assert "".join(ins.pieces) == SHORT and ins.map_labels[0] == "<|endoftext|>"
  summary = report.write_inspection(str(tmp_path / "out"), ins, loaded.tokenizer, {"workdir": str(tmp_path / "wd"),
                                                                                  "checkpoint_step": loaded.step})
  for name in summary["files"]:
    if name.endswith(".png"):
      _check_png(str(tmp_path / "out" / name))


@pytest.mark.slow
def test_command_line(cli, pretrained, tmp_path):
  out = tmp_path / "out"
  result = cli("llm_jax.inspect", f"--workdir={pretrained}", f"--text={SHORT}", f"--out={out}",
               f"--compare={pretrained}", "--top=3", devices=1)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "reference einsum path" in result.stdout and "largest differences" in result.stdout
  with open(out / report.SUMMARY_JSON) as f:
    summary = json.load(f)
  assert sorted(summary["files"]) == sorted(os.listdir(out))
  assert summary["compare"]["mean_difference"] == 0 and len(summary["compare"]["largest"]) == 3
  (tmp_path / "text.txt").write_text(SHORT, encoding="utf-8")
  evaluated = cli("llm_jax.evaluate", f"--workdir={pretrained}", f"--text_files={tmp_path / 'text.txt'}",
                  f"--output={tmp_path / 'eval.json'}", devices=1)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  with open(tmp_path / "eval.json") as f:
    assert abs(json.load(f)["bits_per_byte"] - summary["bits_per_byte"]) < 1e-5


@pytest.mark.slow
def test_bad_input_is_one_line(cli, pretrained, tmp_path):
  out = f"--out={tmp_path / 'out'}"
  assert_cli_error(cli("llm_jax.inspect", f"--workdir={tmp_path / 'missing'}", "--text=hi", out, devices=1),
                   "inspect", f"--workdir={tmp_path / 'missing'}", "does not exist")
  assert_cli_error(cli("llm_jax.inspect", f"--workdir={pretrained}", "--text= \n ", out, devices=1), "inspect",
                   "empty", "--text")
  assert_cli_error(cli("llm_jax.inspect", f"--workdir={pretrained}", f"--text={TEXT}", out, devices=1), "inspect",
                   "--seq_len=64", "--stride")
  other = tmp_path / "other"
  other.mkdir()
  (other / "tokenizer.json").write_text("{}", encoding="utf-8")
  (other / "model.json").write_text(json.dumps({"model": {}, "tokenizer": "tokenizer.json"}), encoding="utf-8")
  assert_cli_error(cli("llm_jax.inspect", f"--workdir={pretrained}", "--text=hi", out, f"--compare={other}",
                       devices=1), "inspect", f"--compare={other}", "tokenizer")
