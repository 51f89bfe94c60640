"""Tests for clean_text against hand-written expected outputs."""

import pytest

from llm_jax.data.text import clean_text


@pytest.mark.parametrize("raw, expected", [
    ("\ufb01ne \uff21\uff22\uff23", "fine ABC"),  # ligature and full-width letters
    ("\u00bd cup", "1\u20442 cup"),  # vulgar fraction -> digits with fraction slash
    ("a\u00a0b\u2003c", "a b c"),  # no-break and em spaces become plain spaces
    ("e\u0301", "\u00e9"),  # decomposed accent composes
])
def test_nfkc(raw, expected):
  assert clean_text(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("Thank you. [Laughter] We go on.", "Thank you. We go on."),
    ("We are great [Applause].", "We are great."),
    ("[Applause]\nThank you.", "Thank you."),
    ("Hola. [The President spoke in Spanish.] Thanks.", "Hola. Thanks."),
    # Not greedy: the text between two notes survives.
    ("a [x] b [y] c", "a b c"),
    # Nested brackets: removing the inner note exposes an outer one.
    ("a [[b]] c", "a c"),
    # A bracket never spans lines, and an unclosed one is left alone.
    ("a [open\nclose] b", "a [open\nclose] b"),
    ("[I repeat, this budget will be balanced.", "[I repeat, this budget will be balanced."),
])
def test_stage_notes_removed(raw, expected):
  assert clean_text(raw) == expected


def test_very_long_bracket_is_kept_as_text():
  paragraph = "[" + "word " * 100 + "end]"  # 505 characters, beyond what a stage note can be
  assert clean_text(paragraph) == paragraph


@pytest.mark.parametrize("raw, expected", [
    ("  a \t b  \n\n\n  c  \r\n", "a b\nc"),
    ("one\r\ntwo\rthree\n", "one\ntwo\nthree"),
    ("p1\n \t \np2", "p1\np2"),
])
def test_whitespace(raw, expected):
  assert clean_text(raw) == expected


@pytest.mark.parametrize("raw", ["", "   \n\t\n", "[Applause]", "[Laughter] [Applause]\n  \n"])
def test_nothing_left_is_empty_string(raw):
  assert clean_text(raw) == ""


def test_fixed_point():
  raw = "  Mr. Speaker [Applause]:\n\n\tthe \ufb01rst e[x]\u0301 item ½  \n[[a]] end [Laughter]."
  once = clean_text(raw)
  assert once == "Mr. Speaker:\nthe first \u00e9 item 1\u20442\nend."
  assert clean_text(once) == once
