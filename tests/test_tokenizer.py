"""Tests for SentencePiece training, lossless round trips, determinism and the tokenizer cache."""

import os
from pydoc_data.topics import topics

import pytest
from conftest import raises_one_line

from llm_jax import errors
from llm_jax import tokenizer as tokenizer_lib
from llm_jax.data.text import clean_text
from llm_jax.tokenizer import Tokenizer
from llm_jax.tokenizer import TokenizerConfig
from llm_jax.tokenizer import get_or_train_tokenizer
from llm_jax.tokenizer import train_tokenizer

DOCS = [clean_text(t) for t in topics.values() if clean_text(t)]
HARD_TEXTS = [
    "Café déjà vu, naïve façade, Ærøskøbing, Łódź.",
    "東京は日本の首都です。北京欢迎你。한국어 텍스트.",
    "Emoji: 🚀🎉👩‍💻 and a flag 🇺🇸.",
    "Two  spaces,\ttab, trailing space \nnew line\n\nblank line, leading\n  indent",
    "",
]


def _config(**overrides) -> TokenizerConfig:
  return TokenizerConfig(**{"model_type": "bpe", "vocab_size": 512, "byte_fallback": True, "path": "",
                            **overrides})


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def trained(request, tmp_path_factory) -> Tokenizer:
  prefix = str(tmp_path_factory.mktemp(request.param) / "spm")
  return train_tokenizer(DOCS, prefix, model_type=request.param, vocab_size=1024)


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_round_trip_is_lossless(trained, text):
  assert trained.decode(trained.encode(text)) == text


def test_unseen_characters_use_byte_pieces(trained):
  pieces = [trained.id_to_piece(i) for i in trained.encode("🚀")]
  assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]  # the UTF-8 bytes of U+1F680


def test_special_ids_and_pieces(trained):
  assert (trained.pad_id, trained.unk_id, trained.bos_id, trained.eos_id) == (0, 1, 2, 3)
  assert [trained.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
  assert trained.vocab_size == 1024
  assert trained.decode([2, *trained.encode("abc"), 3, 0, 0]) == "abc"
  assert trained.encode_batch(["abc", "déf"]) == [trained.encode("abc"), trained.encode("déf")]


def test_compresses_english(trained):
  text = "\n".join(DOCS[:50])
  assert len(text.encode()) / len(trained.encode(text)) > 2.5  # bytes per token; raw bytes would be 1.0


def test_without_byte_fallback_unseen_characters_are_lost(tmp_path):
  tok = train_tokenizer(DOCS, str(tmp_path / "nofb"), model_type="bpe", vocab_size=512, byte_fallback=False)
  assert tok.decode(tok.encode("a 🚀 b")) != "a 🚀 b"
  assert tok.unk_id in tok.encode("🚀")


def test_char_model_ignores_vocab_size(tmp_path):
  tok = train_tokenizer(DOCS, str(tmp_path / "char"), model_type="char", vocab_size=5)
  characters = {c for doc in DOCS for c in doc if c != "\n"}
  assert tok.vocab_size == len(characters) + 4 + 1 + 256  # specials, newline, bytes
  assert tok.decode(tok.encode(HARD_TEXTS[2])) == HARD_TEXTS[2]
  assert [tok.id_to_piece(i) for i in tok.encode("hi yo")] == ["▁", "h", "i", "▁", "y", "o"]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_training_is_deterministic(tmp_path, model_type):
  paths = []
  for name in ("a", "b"):
    tok = train_tokenizer(DOCS[:300], str(tmp_path / name), model_type=model_type, vocab_size=512)
    paths.append(tok.path)
  with open(paths[0], "rb") as f0, open(paths[1], "rb") as f1:
    assert f0.read() == f1.read()


def test_training_input_is_capped_evenly():
  lines = tokenizer_lib._training_lines(["a" * 10 + "\n" + "b" * 10, "c" * 10 + "\n" + "d" * 10], max_chars=20)
  assert lines == ["a" * 10, "c" * 10]


def test_cache_hit_and_miss(tmp_path, monkeypatch):
  calls = []
  real_train = tokenizer_lib.train_tokenizer

  def counting_train(*args, **kwargs):
    calls.append(kwargs)
    return real_train(*args, **kwargs)

  monkeypatch.setattr(tokenizer_lib, "train_tokenizer", counting_train)
  docs = DOCS[:200]
  first = get_or_train_tokenizer(docs, _config(), str(tmp_path))
  again = get_or_train_tokenizer(list(docs), _config(), str(tmp_path))
  assert len(calls) == 1 and again.path == first.path
  variants = [
      (docs, _config(vocab_size=600)),
      (docs, _config(model_type="unigram")),
      (docs, _config(byte_fallback=False)),
      (docs[:-1], _config()),
      (docs[:-1] + [docs[-1] + "!"], _config()),
  ]
  paths = {first.path}
  for variant_docs, cfg in variants:
    paths.add(get_or_train_tokenizer(variant_docs, cfg, str(tmp_path)).path)
  assert len(calls) == 1 + len(variants) and len(paths) == 1 + len(variants)
  assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)  # no temp files left


def test_path_loads_existing_model(tmp_path):
  trained = train_tokenizer(DOCS[:100], str(tmp_path / "pre"), model_type="bpe", vocab_size=400)
  loaded = get_or_train_tokenizer(["other corpus"], _config(path=trained.path), str(tmp_path / "cache"))
  assert loaded.path == trained.path and loaded.vocab_size == 400
  assert not os.path.exists(tmp_path / "cache")


@pytest.mark.parametrize("kwargs, kind, fragments", [
    ({"model_type": "wordpiece", "vocab_size": 512}, errors.ConfigError,
     ("tokenizer.model_type='wordpiece'", "--config.tokenizer.model_type=")),
    ({"model_type": "bpe", "vocab_size": 100}, errors.DataError, ("vocab_size=100", "--config.tokenizer.vocab_size")),
    ({"model_type": "bpe", "vocab_size": 1_000_000}, errors.DataError,
     ("vocab_size=1000000", "Vocabulary size too high", "--config.tokenizer.vocab_size")),
])
def test_training_errors(tmp_path, kwargs, kind, fragments):
  with raises_one_line(kind, *fragments):
    train_tokenizer(DOCS[:50], str(tmp_path / "x"), **kwargs)


def test_missing_model_file(tmp_path):
  with raises_one_line(errors.DataError, repr(str(tmp_path / "none.model")), "does not exist",
                       "--config.tokenizer.path="):
    get_or_train_tokenizer(DOCS, _config(path=str(tmp_path / "none.model")), str(tmp_path))


def test_lines_over_sentencepiece_limit_are_chunked_not_dropped(tmp_path):
  # sentencepiece silently skips input lines over max_sentence_length (64 KB); 'ζ' occurs only in such a line.
  long_line = "the quick brown fox jumps over the lazy dog " * 2000 + "ζ"
  assert len(long_line.encode("utf-8")) > tokenizer_lib.MAX_SENTENCE_BYTES
  tok = train_tokenizer([long_line, "a short line"], str(tmp_path / "long"), model_type="char", vocab_size=0)
  assert "ζ" in {tok.id_to_piece(i) for i in range(tok.vocab_size)}
  chunks = tokenizer_lib._training_lines([long_line], 10**9)  # pylint: disable=protected-access
  assert "".join(chunks) == long_line and all(len(c.encode()) <= tokenizer_lib.MAX_SENTENCE_BYTES for c in chunks)
