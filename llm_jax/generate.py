"""`python -m llm_jax.generate --workdir=DIR --prompt=...`: sample continuations from a trained model; with `--chat`,
assistant replies through the model's chat template.

--chat --prompt=TEXT answers the one user message TEXT. --chat without --prompt reads user turns from stdin, one per
line, and keeps the conversation (each turn's first reply joins it) until end of input.
"""

from __future__ import annotations

import sys
from typing import Iterator
from typing import Sequence

from absl import app
from absl import flags

from llm_jax import chat
from llm_jax import errors
from llm_jax import launch
from llm_jax import sampling
from llm_jax import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A directory written by llm_jax.train or llm_jax.convert.")
_DEFAULT = sampling.SampleConfig()
_PROMPT = flags.DEFINE_string("prompt", _DEFAULT.prompt, "Text to continue.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", _DEFAULT.max_length, "Total tokens per sequence, prompt included.")
_NUM = flags.DEFINE_integer("num_return_sequences", _DEFAULT.num_return_sequences, "Continuations to sample (greedy "
                            "decoding has one).")
_TEMPERATURE = flags.DEFINE_float("temperature", _DEFAULT.temperature, "Softmax temperature; 0 decodes greedily, "
                                  "and so does any temperature below 1e-6 (smaller ones overflow); nan and inf are "
                                  "refused.")
_TOP_K = flags.DEFINE_integer("top_k", _DEFAULT.top_k, "Keep the k most likely tokens; 0 keeps all.")
_TOP_P = flags.DEFINE_float("top_p", _DEFAULT.top_p, "Nucleus sampling mass; 1.0 keeps all.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to load; default the newest.")
_CHAT = flags.DEFINE_bool("chat", False, "Reply as the assistant through the model's chat template (its tokenizer's "
                          "chat_template, else llm_jax.chat's default), stopping at end-of-turn: --prompt is the user "
                          "message, or user turns come from stdin, one per line.")
flags.mark_flag_as_required("workdir")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

  def body() -> None:
    # Flag checks before the checkpoint is read; the prompt's length is checked once the tokenizer is loaded.
    request = sampling.SampleConfig(prompt=_PROMPT.value, max_length=_MAX_LENGTH.value,
                                    num_return_sequences=_NUM.value, temperature=_TEMPERATURE.value,
                                    top_k=_TOP_K.value, top_p=_TOP_P.value)
    given = [name for name in ("num_return_sequences", "top_k", "top_p", "seed") if flags.FLAGS[name].present]
    num = request.check(given, prefix="--")
    loaded = workdir_lib.load_model(_WORKDIR.value, _STEP.value)
    if _CHAT.value:
      _chat(loaded, num)
      return
    texts = sampling.generate_texts(loaded.params, loaded.cfg, loaded.tokenizer, _PROMPT.value,
                                    max_length=_MAX_LENGTH.value, num_return_sequences=num,
                                    temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                                    seed=_SEED.value)
    for i, text in enumerate(texts, 1):
      print(f"--- {i}: {text}", flush=True)

  launch.run_main("llm_jax.generate", body)


def _stdin_turns() -> Iterator[str]:
  """User turns from stdin, one per line; a ValueError names the first line that is not UTF-8 text."""
  for number, line in enumerate(sys.stdin.buffer, 1):
    try:
      yield line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
      raise errors.DataError(f"line {number} of stdin is not UTF-8 text (byte {line[e.start]:#04x} at "
                             f"offset {e.start}); send UTF-8 (e.g. through iconv -t UTF-8)") from None


def _chat(loaded: workdir_lib.LoadedModel, num_return_sequences: int) -> None:
  """Replies to --prompt, or to each line of stdin in one growing conversation."""
  template = chat.template_for(loaded.tokenizer.path)
  turns = [_PROMPT.value] if flags.FLAGS["prompt"].present else _stdin_turns()
  messages: list[dict[str, str]] = []
  for turn in turns:
    if not turn.strip():
      continue
    messages.append({"role": "user", "content": turn})
    replies = sampling.chat_replies(loaded.params, loaded.cfg, loaded.tokenizer, template, messages,
                                    max_length=_MAX_LENGTH.value, num_return_sequences=num_return_sequences,
                                    temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                                    seed=_SEED.value + len(messages))
    for i, reply in enumerate(replies, 1):
      print(f"--- {i}: {reply}", flush=True)
    messages.append({"role": "assistant", "content": replies[0]})


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
