"""Supervised fine-tuning: templates, per-token loss weights, packing, one-line errors, and a tiny end-to-end run."""

import json

import jax
import numpy as np
import pytest
from conftest import SFT_ROWS
from conftest import raises_one_line
from conftest import sft_config

from llm_jax import chat
from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import sampling
from llm_jax import steps as steps_lib
from llm_jax import trainer
from llm_jax import workdir as workdir_lib
from llm_jax.data import packing
from llm_jax.data import pipeline
from llm_jax.data import sft
from llm_jax.data.corpus import DataConfig
from llm_jax.model import Transformer
from llm_jax.tokenizer import TokenizerConfig

CONVERSATION = [{"role": "system", "content": "Answer with a name."},
                {"role": "user", "content": "Who gave the first address?"},
                {"role": "assistant", "content": "George Washington"},
                {"role": "user", "content": "And in 1801?"},
                {"role": "assistant", "content": "Thomas Jefferson"}]


@pytest.fixture(name="tok", scope="module")
def tok_fixture(pretrained):
  return workdir_lib.load_model(pretrained).tokenizer


def _examples(tok, rows=SFT_ROWS, seq_len=200, train_on_prompt=False):
  return [sft.make_example(row, f"row {i}", tok, chat.ChatTemplate(), train_on_prompt=train_on_prompt,
                           seq_len=seq_len) for i, row in enumerate(rows)]


def test_rendered_prompt_tokens_are_a_prefix_of_the_rendered_conversation(tok):
  template = chat.ChatTemplate()
  for turn in (2, 4):
    prompt_ids = sampling.prompt_ids(tok, template.render(CONVERSATION[:turn], add_generation_prompt=True))
    conversation_ids = sampling.prompt_ids(tok, template.render(CONVERSATION))
    assert conversation_ids[:len(prompt_ids)] == prompt_ids
  assert tok.decode(tok.encode(template.render(CONVERSATION))) == template.render(CONVERSATION)  # marker round-trips


def test_only_completion_and_assistant_tokens_count(tok):
  completion, conversation = _examples(tok, [SFT_ROWS[0], {"messages": CONVERSATION}])
  assert tok.decode(completion.tokens[completion.weights > 0]) == "1790"  # and eos, which decodes to nothing
  assert completion.tokens[-1] == tok.eos_id and completion.weights[-1] == 1
  end = chat.END_OF_TURN + "\n"
  assert tok.decode(conversation.tokens[conversation.weights > 0]) == f"George Washington{end}Thomas Jefferson{end}"
  everything = _examples(tok, [{"messages": CONVERSATION}], train_on_prompt=True)[0]
  assert everything.weights.all() and np.array_equal(everything.tokens, conversation.tokens)


def test_packing_keeps_weights_aligned_with_their_tokens(tok):
  examples = _examples(tok, [*SFT_ROWS, {"messages": CONVERSATION}] * 3, seq_len=150)
  tokens, segments, weights = sft.pack_examples(examples, 150)
  found = []
  for r in range(len(tokens)):
    for segment in range(1, segments[r].max() + 1):
      at = segments[r] == segment
      found.append((tokens[r, at], weights[r, at]))
  assert len(found) == len(examples)
  for (got_tokens, got_weights), example in zip(found, examples):
    assert np.array_equal(got_tokens, example.tokens) and np.array_equal(got_weights, example.weights)
  batch = packing.make_example(tokens, segments, weights)
  # The loss counts target t+1 exactly when its weight is set and it stays in its input's example.
  expected = weights[:, 1:] * (segments[:, 1:] == segments[:, :-1]) * (segments[:, :-1] > 0)
  assert np.array_equal(batch["loss_mask"], expected) and np.array_equal(batch["targets"], tokens[:, 1:])


@pytest.mark.slow
def test_weighted_loss_equals_a_hand_computation_over_completion_tokens(pretrained, tok):
  loaded = workdir_lib.load_model(pretrained)
  examples = _examples(tok, seq_len=63)
  tokens, segments, weights = sft.pack_examples(examples, 63)
  batch = jax.tree.map(np.asarray, packing.make_example(tokens, segments, weights))
  out = jax.jit(lambda p, b: steps_lib.eval_step(p, b, model=Transformer(loaded.cfg)))(loaded.params, batch)
  # By hand: each example alone, unpacked (padded at the end, which causal attention never reads); the mean NLL
  # of its weighted targets over all examples.
  forward = jax.jit(lambda p, t: Transformer(loaded.cfg).apply({"params": p}, t)[0])
  nll = []
  for example in examples:
    logits = forward(loaded.params, np.pad(example.tokens, (0, 64 - len(example.tokens)))[None, :-1])
    log_probs = jax.nn.log_softmax(np.asarray(logits[0], np.float64))
    for t in np.flatnonzero(example.weights[1:]):
      nll.append(-log_probs[t, example.tokens[t + 1]])
  assert float(out["tokens"]) == len(nll)
  np.testing.assert_allclose(float(out["nll_sum"]) / float(out["tokens"]), np.mean(nll), rtol=1e-5)


# Each names the row and what in it is wrong (the field, the message and its role, the setting it overruns).
BAD_ROWS = [
    ("no completion", {"prompt": "hi"}, ("'completion'", "'messages'", "['prompt']")),
    ("unknown role", {"messages": [{"role": "bot", "content": "x"}]}, ("message 0", "'bot'")),
    ("no assistant turn", {"messages": [{"role": "user", "content": "x"}]}, ("assistant",)),
    ("all masked", {"prompt": "x" * 400, "completion": "y"}, ("data.seq_len=63",)),
]


@pytest.mark.parametrize("name, row, fragments", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_rows_are_refused_in_one_line_naming_the_row(name, row, fragments, tok):
  del name
  with raises_one_line(errors.DataError, "row 7", *fragments):
    sft.make_example(row, "row 7", tok, chat.ChatTemplate(), train_on_prompt=False, seq_len=63)


def test_a_template_that_fails_to_render_names_the_row(tmp_path, tok):
  path = tmp_path / "rows.jsonl"
  path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
  template = chat.ChatTemplate(source="{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}"
                                      "{% endif %}")
  with raises_one_line(errors.DataError, f"{path} line 1", "chat template", "(TemplateError: no system)"):
    sft.load_examples(str(path), tok, template, train_on_prompt=False, seq_len=63)


def test_a_hugging_face_chat_template_is_read_beside_the_tokenizer(tmp_path):
  source = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": source, "eos_token": "</s>"}))
  template = chat.template_for(str(tmp_path / "tokenizer.json"))
  assert template.end_of_turn == "</s>" and template.render(CONVERSATION[1:3]) == (
      "[user]Who gave the first address?</s>[assistant]George Washington</s>")
  assert chat.template_for(str(tmp_path / "spm.model")) == chat.ChatTemplate()


def _completion_loss(workdir, data):
  loaded = workdir_lib.load_model(workdir)
  out = steps_lib.eval_step(loaded.params, jax.tree.map(np.asarray, packing.make_example(*data.train.rows(
      np.arange(data.train.num_rows)))), model=Transformer(loaded.cfg))
  return float(out["nll_sum"]) / float(out["tokens"])


@pytest.mark.slow
def test_a_tiny_sft_fine_tune_lowers_the_completion_loss(pretrained, sft_rows, tmp_path, cli):
  config = sft_config(pretrained, sft_rows)
  data = pipeline.prepare_sft(DataConfig(corpus="sft", sft_files=sft_rows, validation_fraction=0.2, seq_len=64),
                              TokenizerConfig(path=workdir_lib.read_model_card(pretrained)[1]))
  workdir = str(tmp_path / "sft")
  trainer.train_and_evaluate(config_lib.resolve(config), workdir)
  before, after = _completion_loss(pretrained, data), _completion_loss(workdir, data)
  assert after < before - 0.5, (before, after)
  result = cli("llm_jax.generate", f"--workdir={workdir}", "--chat", "--prompt=Who?",
               "--num_return_sequences=1", "--max_length=64", "--temperature=0", devices=1)
  assert result.returncode == 0, result.stderr[-2000:]
  reply = result.stdout.strip().removeprefix("--- 1: ")
  assert chat.END_OF_TURN not in reply and result.stdout.count("--- ") == 1
