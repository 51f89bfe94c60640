"""SentencePiece tokenizers: deterministic training, a cache keyed by corpus and settings, load, encode, decode.

`load_tokenizer` also opens Hugging Face tokenizer.json files (`llm_jax.hf.tokenizer`), so converted
pretrained models keep their own tokenizer; both classes share encode/decode/vocab_size/bos_id/eos_id/pad_id/path.

Trained models use ids pad=0, unk=1, bos=2, eos=3, identity normalisation (the corpus is already NFKC) and
byte fallback with full character coverage, so any text, accents, CJK and emoji included, round-trips
exactly: decode(encode(s)) == s. Newline is a piece of its own, because documents keep one paragraph per line.
"""

import dataclasses
import hashlib
import io
import os
from typing import Callable
from typing import Iterable
from typing import Iterator
from typing import Sequence

import sentencepiece as spm

from llm_jax import errors
from llm_jax import paths
from llm_jax.hf.tokenizer import HFTokenizer

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_USER_SYMBOLS = ["\n"]  # newline, a piece of its own in every vocabulary
NUM_SPECIAL_PIECES = 4 + len(_USER_SYMBOLS)  # pad, unk, bos, eos and the user symbols: in every trained vocabulary
MODEL_TYPES = ("bpe", "unigram", "char")
# Training reads at most this many characters, sampled evenly across the corpus: about 0.2 s for bpe and
# 2-3 s for unigram on 2 cores, and more text barely changes a vocabulary of a few thousand pieces.
MAX_TRAIN_CHARS = 3_000_000
# Part of the cache key: bump it whenever the training recipe below changes, so old cached models are not reused.
_RECIPE_VERSION = "1"
# For `char` the vocabulary is every character seen plus the specials and bytes; sentencepiece caps a larger
# request at what it needs, so asking for this many always trains.
_CHAR_VOCAB_REQUEST = 1 << 20


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """The vocabulary to train, or an existing tokenizer file; the one table of the tokenizer section's defaults."""

  model_type: str = "bpe"  # 'bpe', 'unigram' or 'char'.
  vocab_size: int = 2048  # Pieces to train, 261 of them fixed (ignored for 'char', which takes every character seen).
  byte_fallback: bool = True  # Lossless on any UTF-8 text.
  path: str = ""  # An existing tokenizer (sentencepiece .model or HF tokenizer.json) instead of training one.

  def check(self) -> None:
    """Refuses (ConfigError, one line) a vocabulary that cannot be trained, and training settings beside a file."""
    errors.require_choice("tokenizer.model_type", self.model_type, MODEL_TYPES)
    if self.path:
      for key in ("model_type", "vocab_size", "byte_fallback"):
        errors.refuse_ignored(f"tokenizer.{key}", getattr(self, key), getattr(TokenizerConfig, key),
                              f"tokenizer.path={self.path!r}", "tokenizer.path='' to train one")
      return
    if self.model_type == "char":
      return  # takes every character seen; vocab_size is not read
    fixed = NUM_SPECIAL_PIECES + (256 if self.byte_fallback else 0)
    errors.require(self.vocab_size > fixed, f"tokenizer.vocab_size={self.vocab_size} leaves no room for learned "
                   f"pieces: {fixed} pieces are fixed (pad, unk, bos, eos, newline"
                   f"{' and 256 byte-fallback pieces' if self.byte_fallback else ''}); pass e.g. "
                   "--config.tokenizer.vocab_size=2048")


class Tokenizer:
  """A loaded SentencePiece model; `path` is the .model file it came from."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: str):
    self._processor = processor
    self.path = path
    # Read from the model, so pretrained tokenizers with other conventions still report their own ids.
    self.pad_id = processor.pad_id() if processor.pad_id() >= 0 else PAD_ID
    self.unk_id = processor.unk_id()
    self.bos_id = processor.bos_id()
    self.eos_id = processor.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise errors.DataError(f"tokenizer {path} has no bos/eos pieces (bos={self.bos_id}, eos={self.eos_id}), which "
                             "document packing needs; use a model trained with them or clear tokenizer.path")

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    """Loads a SentencePiece .model file (read as bytes, so a gs:// path works too)."""
    if not paths.as_path(path).is_file():
      raise errors.DataError(f"tokenizer model {path!r} does not exist; pass an existing .model file with "
                             "--config.tokenizer.path=... or leave it empty to train one")
    processor = spm.SentencePieceProcessor()
    try:
      processor.LoadFromSerializedProto(paths.as_path(path).read_bytes())
    except (OSError, RuntimeError) as e:  # sentencepiece reports a truncated or foreign file as either
      reason = str(e).strip().splitlines()[-1][:120] if str(e).strip() else type(e).__name__
      raise errors.DataError(f"tokenizer model {path} is unreadable ({reason}); delete it to have it retrained, or fix "
                             "--config.tokenizer.path") from None
    return cls(processor, path)

  @property
  def vocab_size(self) -> int:
    return self._processor.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Returns the ids of `text`, without bos/eos."""
    return self._processor.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str], threads: int = 0) -> list[list[int]]:
    """Returns the ids of each text, encoded on `threads` threads (0: all cores)."""
    return self._processor.encode(list(texts), out_type=int, num_threads=threads or os.cpu_count() or 1)

  def decode(self, ids: Sequence[int]) -> str:
    """Returns the text of `ids`; pad, bos and eos decode to nothing."""
    return self._processor.decode([int(i) for i in ids])

  def id_to_piece(self, token_id: int) -> str:
    return self._processor.id_to_piece(int(token_id))


def load_tokenizer(path: str) -> "Tokenizer | HFTokenizer":
  """Loads a Hugging Face tokenizer.json (any *.json) or else a SentencePiece .model file."""
  if path.endswith(".json"):
    return HFTokenizer.load(path)
  return Tokenizer.load(path)


# sentencepiece's max_sentence_length, in bytes: it silently skips longer input lines.
MAX_SENTENCE_BYTES = 1 << 16


def _chunks(line: str) -> list[str]:
  """`line`, cut into pieces sentencepiece will not skip (a UTF-8 character is at most 4 bytes)."""
  if len(line.encode("utf-8")) <= MAX_SENTENCE_BYTES:
    return [line]
  step = MAX_SENTENCE_BYTES // 4
  return [line[i:i + step] for i in range(0, len(line), step)]


def _training_lines(documents: Sequence[str], max_chars: int) -> list[str]:
  """Returns the documents' paragraphs, every k-th one when they exceed `max_chars`, so all eras are sampled."""
  return sample_training_lines(lambda: documents, max_chars)


def sample_training_lines(make_documents: Callable[[], Iterable[str]], max_chars: int) -> list[str]:
  """Every k-th paragraph of the documents, k = ceil(total chars / max_chars), in two streaming passes (one to
  count, one to take), so memory is bounded by the sample and the result equals slicing the full paragraph list.

  Paragraphs over MAX_SENTENCE_BYTES are split into chunks first: sentencepiece would drop them silently, and a
  corpus of only such lines then failed with advice to change the vocabulary size.
  """
  def pieces() -> Iterator[str]:
    for doc in make_documents():
      for line in doc.split("\n"):
        if line:
          yield from _chunks(line)

  total = sum(len(piece) for piece in pieces())
  stride = max(1, -(-total // max_chars))
  return [piece for index, piece in enumerate(pieces()) if index % stride == 0]


def train_tokenizer(documents: Sequence[str] | Callable[[], Iterable[str]], model_prefix: str, *, model_type: str,
                    vocab_size: int, byte_fallback: bool = True, max_train_chars: int = MAX_TRAIN_CHARS) -> Tokenizer:
  """Trains a SentencePiece model on `documents` (a list, or a function streaming them), writes
  `{model_prefix}.model` atomically and loads it.

  Training is single-threaded with a fixed sample of the input, so the same documents and settings give
  byte-identical model files. For model_type='char' vocab_size is ignored: the model holds every character
  seen, plus the 4 specials, newline and (with byte_fallback) the 256 byte pieces.
  """
  make_documents = documents if callable(documents) else lambda: documents
  return _train_on_lines(sample_training_lines(make_documents, max_train_chars), model_prefix, model_type=model_type,
                         vocab_size=vocab_size, byte_fallback=byte_fallback)


def _train_on_lines(lines: list[str], model_prefix: str, *, model_type: str, vocab_size: int,
                    byte_fallback: bool) -> Tokenizer:
  if model_type not in MODEL_TYPES:
    raise errors.ConfigError(f"tokenizer.model_type={model_type!r} is not one of {MODEL_TYPES}; pass e.g. "
                             "--config.tokenizer.model_type=bpe")
  if not lines:
    raise errors.DataError("cannot train a tokenizer on an empty corpus; check --config.data.corpus")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type=model_type,
        vocab_size=_CHAR_VOCAB_REQUEST if model_type == "char" else vocab_size,
        byte_fallback=byte_fallback, character_coverage=1.0,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, user_defined_symbols=_USER_SYMBOLS,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        # Paragraphs are long; the default (4192 bytes) would silently skip them. _training_lines cuts any
        # longer line into chunks of at most this, so no text is dropped.
        max_sentence_length=MAX_SENTENCE_BYTES, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=1, minloglevel=2)
  except RuntimeError as e:
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    raise errors.DataError(f"sentencepiece could not train a {model_type} tokenizer with vocab_size={vocab_size} "
                           f"({reason}); change --config.tokenizer.vocab_size") from None
  path = model_prefix + ".model"
  paths.makedirs(os.path.dirname(paths.absolute(path)))
  paths.write_atomic(path, model.getvalue())  # A concurrent reader sees no model or a whole one.
  return Tokenizer.load(path)


def corpus_fingerprint(documents: Sequence[str]) -> str:
  """Returns a SHA-256 hex digest of the documents, their order and boundaries."""
  digest = hashlib.sha256()
  for doc in documents:
    data = doc.encode("utf-8")
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)
  return digest.hexdigest()


def get_or_train_tokenizer(documents: Sequence[str], tok_cfg: TokenizerConfig,
                           cache_dir: str) -> "Tokenizer | HFTokenizer":
  """Loads tok_cfg.path (.model or tokenizer.json) if set; otherwise reuses or trains a model cached in `cache_dir`.

  The cache file name carries a hash of (corpus text, model_type, vocab_size, byte_fallback, recipe version),
  so the same corpus and settings reuse the file and anything else trains a new one.
  """
  return get_or_train_streaming(lambda: documents, corpus_fingerprint(documents), tok_cfg, cache_dir)


def get_or_train_streaming(make_documents: Callable[[], Iterable[str]], corpus_key: str, tok_cfg: TokenizerConfig,
                           cache_dir: str) -> "Tokenizer | HFTokenizer":
  """As `get_or_train_tokenizer`, for a corpus streamed by `make_documents()` (called twice on a cache miss) and
  named by `corpus_key` (a content hash, or a cheap identity of the inputs such as paths, sizes and mtimes)."""
  if tok_cfg.path:
    return load_tokenizer(os.path.expanduser(tok_cfg.path))  # a no-op on a URL
  settings = f"{_RECIPE_VERSION}|{tok_cfg.model_type}|{tok_cfg.vocab_size}|{bool(tok_cfg.byte_fallback)}"
  key = hashlib.sha256(f"{settings}|{corpus_key}".encode()).hexdigest()[:16]
  prefix = os.path.join(cache_dir, f"spm_{tok_cfg.model_type}_{tok_cfg.vocab_size}_{key}")
  if paths.as_path(prefix + ".model").is_file():
    return Tokenizer.load(prefix + ".model")
  return train_tokenizer(make_documents, prefix, model_type=tok_cfg.model_type, vocab_size=tok_cfg.vocab_size,
                         byte_fallback=bool(tok_cfg.byte_fallback))
