"""Tests for Hugging Face tokenizer.json support: special ids from the files, dispatch, and packing without BOS."""

import json

import numpy as np
import pytest
import tiny_hf
from conftest import raises_one_line

from llm_jax import errors
from llm_jax.data.packing import pack_documents
from llm_jax.hf import tokenizer as hf_tokenizer
from llm_jax.hf.tokenizer import HFTokenizer
from llm_jax.tokenizer import Tokenizer
from llm_jax.tokenizer import TokenizerConfig
from llm_jax.tokenizer import get_or_train_tokenizer
from llm_jax.tokenizer import load_tokenizer
from llm_jax.tokenizer import train_tokenizer

TEXT = "Café déjà vu 🚀, two  spaces\nand a new line."


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory) -> HFTokenizer:
  """Byte-level BPE with nothing prepended and no tokenizer_config.json."""
  path = tmp_path_factory.mktemp("gpt2") / "tokenizer.json"
  tiny_hf.byte_level_bpe(["<|endoftext|>"], None).save(str(path))
  return load_tokenizer(str(path))


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory) -> HFTokenizer:
  directory = tmp_path_factory.mktemp("llama")
  tiny_hf.byte_level_bpe(list(tiny_hf.LLAMA_SPECIALS.values()), "<s>").save(str(directory / "tokenizer.json"))
  tiny_hf.write_json(str(directory / "tokenizer_config.json"), tiny_hf.LLAMA_SPECIALS)
  return load_tokenizer(str(directory / "tokenizer.json"))


def test_gpt2_style_has_no_bos(gpt2_style):
  assert isinstance(gpt2_style, HFTokenizer)
  assert gpt2_style.bos_id == -1
  assert gpt2_style.eos_id == gpt2_style.token_to_id("<|endoftext|>") == 0
  assert gpt2_style.vocab_size == tiny_hf.BPE_VOCAB
  assert gpt2_style.decode(gpt2_style.encode(TEXT)) == TEXT  # byte-level BPE is lossless
  assert gpt2_style.decode([gpt2_style.eos_id, *gpt2_style.encode("abc"), gpt2_style.eos_id]) == "abc"
  assert gpt2_style.encode_batch(["abc", TEXT]) == [gpt2_style.encode("abc"), gpt2_style.encode(TEXT)]


def test_llama_style_prepends_bos(llama_style):
  assert (llama_style.unk_id, llama_style.bos_id, llama_style.eos_id) == (0, 1, 2)
  assert llama_style.pad_id == hf_tokenizer.DEFAULT_PAD_ID
  assert 1 not in llama_style.encode("hello")  # encode never adds specials
  assert llama_style.id_to_piece(1) == "<s>"


def test_eos_from_an_added_token_dict(tmp_path):
  tiny_hf.byte_level_bpe(["<unk>", "<s>", "</s>", "<end>"], "<s>").save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<end>", "special": True}}))
  assert load_tokenizer(str(tmp_path / "tokenizer.json")).eos_id == 3


def test_no_end_of_text_token_is_an_error(tmp_path):
  tiny_hf.byte_level_bpe(["<s>"], "<s>").save(str(tmp_path / "tokenizer.json"))
  with raises_one_line(errors.DataError, str(tmp_path / "tokenizer.json"), "has no end-of-text token",
                       f"eos_token in {tmp_path / 'tokenizer_config.json'}"):
    load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_bad_files(tmp_path):
  with raises_one_line(errors.DataError, repr(str(tmp_path / "tokenizer.json")), "does not exist"):
    load_tokenizer(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer.json").write_text("{}")
  with raises_one_line(errors.DataError, f"{tmp_path / 'tokenizer.json'} is not a Hugging Face tokenizer.json"):
    load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_dispatch_by_file_name(tmp_path, gpt2_style):
  sp = train_tokenizer(tiny_hf.TEXTS[:50], str(tmp_path / "sp"), model_type="bpe", vocab_size=400)
  assert isinstance(load_tokenizer(sp.path), Tokenizer)
  config = TokenizerConfig(model_type="bpe", vocab_size=512, byte_fallback=True, path=gpt2_style.path)
  assert isinstance(get_or_train_tokenizer(["unused"], config, str(tmp_path / "cache")), HFTokenizer)


def test_packing_without_bos():
  tokens, segment_ids = pack_documents([[5, 6, 7], [8], [9, 10]], seq_len=4, bos_id=-1, eos_id=0)
  np.testing.assert_array_equal(tokens, [[5, 6, 7, 0, 8], [0, 9, 10, 0, 0]])
  np.testing.assert_array_equal(segment_ids, [[1, 1, 1, 1, 2], [1, 2, 2, 2, 0]])
