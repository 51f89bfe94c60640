"""Chat templates: conversations rendered to text (a Hugging Face tokenizer's Jinja2 `chat_template`, else ours),
the end-of-turn marker, and the character spans of assistant turns that supervised fine-tuning learns from.

The default template writes each turn as a header line, the content and the end-of-turn marker as plain text:

    <|system|>\\nYou are terse.<|end|>\\n<|user|>\\nWhich year?<|end|>\\n<|assistant|>\\n1790<|end|>\\n

The marker is text, not a new token: our sentencepiece tokenizers (byte fallback, identity normalisation) encode it
into a few ordinary pieces that decode back to exactly `<|end|>`, so a model trained before SFT needs no new
embedding row and `generate --chat` stops where the decoded text reaches the marker. Headers and markers end in a
newline, which is a piece of its own in our tokenizers, so turn boundaries fall on token boundaries.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any
from typing import Sequence

import jinja2
import jinja2.sandbox

from llm_jax import errors

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"
DEFAULT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + END_OF_TURN + "\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
HF_CONFIG_FILE = "tokenizer_config.json"  # as llm_jax.hf.tokenizer.CONFIG_FILE


class TemplateError(errors.DataError):
  """A conversation the template cannot render (the message names the row)."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A Jinja2 chat template, the marker that ends an assistant turn, and the special tokens it may name."""

  source: str = DEFAULT_TEMPLATE
  end_of_turn: str = END_OF_TURN
  bos_token: str = ""
  eos_token: str = ""

  def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as text; with `add_generation_prompt`, followed by the header of an assistant turn."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
      raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    try:
      return env.from_string(self.source).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                 bos_token=self.bos_token, eos_token=self.eos_token)
    except (jinja2.TemplateError, TemplateError, TypeError, KeyError, IndexError) as e:
      raise TemplateError(f"the chat template failed to render ({type(e).__name__}: {e})") from None

  def assistant_spans(self, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [start, end) character spans of each assistant turn, marker included).

    A turn's span starts after the conversation before it rendered with the generation prompt, and ends where the
    conversation up to and including it ends, so what a model learns is exactly what `generate --chat` asks for.
    """
    text = self.render(messages)
    spans = []
    for i, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      before = self.render(messages[:i], add_generation_prompt=True)
      through = self.render(messages[:i + 1])
      if not (through.startswith(before) and text.startswith(through)):
        raise TemplateError(f"the chat template does not render turn {i} as a continuation of the turns before it, "
                            "so its tokens cannot be told apart; use a template that renders turn by turn")
      spans.append((len(before), len(through)))
    return text, spans


def check_messages(messages: Any) -> None:
  """Refuses anything but a list of {role, content} with known roles and at least one assistant turn."""
  if not isinstance(messages, list) or not messages:
    raise TemplateError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
      raise TemplateError(f"message {i} is not a {{\"role\", \"content\"}} object with string content")
    if message.get("role") not in ROLES:
      raise TemplateError(f"message {i} has the unknown role {message.get('role')!r}; use one of {', '.join(ROLES)}")
  if not any(m["role"] == "assistant" for m in messages):
    raise TemplateError("the conversation has no assistant turn, so there is nothing to learn from it; add one or "
                        "drop the row")


def template_for(tokenizer_path: str) -> ChatTemplate:
  """The `chat_template` of the tokenizer_config.json beside a Hugging Face tokenizer.json, else the default.

  A Hugging Face template ends turns with the tokenizer's own marker: `eos_token` there (Llama 3's `<|eot_id|>`
  is named so in its instruct models' configs).
  """
  config_path = os.path.join(os.path.dirname(tokenizer_path), HF_CONFIG_FILE)
  if not tokenizer_path.endswith(".json") or not os.path.isfile(config_path):
    return ChatTemplate()
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  source = config.get("chat_template")
  if isinstance(source, list):  # several named templates: take the default one
    source = next((t.get("template") for t in source if t.get("name") == "default"), None)
  if not isinstance(source, str) or not source:
    return ChatTemplate()
  eos = _token_text(config.get("eos_token"))
  return ChatTemplate(source=source, end_of_turn=eos, bos_token=_token_text(config.get("bos_token")), eos_token=eos)


def _token_text(token: Any) -> str:
  """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
  if isinstance(token, dict):
    return str(token.get("content") or "")
  return token if isinstance(token, str) else ""
