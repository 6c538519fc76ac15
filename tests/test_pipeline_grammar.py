"""The corpus grammar's answers are right, checked against independently written number words."""

import re

import pytest

from data_pipelines import grammar

EN = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
      "fifteen sixteen seventeen eighteen nineteen twenty").split()
ZH_DIGITS = {"零": 0, "一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
ZH_OPS = {"加": "plus", "减": "minus", "減": "minus", "乘": "times"}
APPLY = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


def zh_number(s: str) -> int:
  """Chinese numerals 0..20 ('十', '十三', '二十')."""
  if s == "十":
    return 10
  if "十" in s:
    tens, _, ones = s.partition("十")
    return 10 * (ZH_DIGITS[tens] if tens else 1) + (ZH_DIGITS[ones] if ones else 0)
  return ZH_DIGITS[s]


WORLD = grammar.World.make(0)


def test_english_arithmetic_answers():
  qs = [q for q in grammar.all_sentences(WORLD, "english", True) if q.topic == "arithmetic"]
  assert len(qs) > 300
  for q in qs:
    a, op, b = re.fullmatch(r"what is (\w+) (plus|minus|times) (\w+)\?", q.text).groups()
    assert EN.index(q.answer) == APPLY[op](EN.index(a), EN.index(b)), q
  assert grammar.arithmetic("plus", 3, 4, "english", True).text == "what is three plus four?"
  assert grammar.arithmetic("plus", 3, 4, "english", True).answer == "seven"


@pytest.mark.parametrize("language,pattern", [("mandarin", r"(\w+?)([加减乘])(\w+?)等于几？"),
                                              ("cantonese", r"(\w+?)([加減乘])(\w+?)等於幾多？")])
def test_chinese_arithmetic_answers(language, pattern):
  qs = [q for q in grammar.all_sentences(WORLD, language, True) if q.topic == "arithmetic"]
  for q in qs:
    a, op, b = re.fullmatch(pattern, q.text).groups()
    assert zh_number(q.answer) == APPLY[ZH_OPS[op]](zh_number(a), zh_number(b)), q


@pytest.mark.parametrize("language", grammar.LANGUAGES)
def test_world_questions_agree_with_statements(language):
  """The answer to 'what colour is X' / 'who owns X' is what the statements about X say."""
  for obj in range(len(grammar.OBJECTS)):
    for ask in (grammar.colour_of, grammar.owner_of):
      q, s = ask(WORLD, obj, language, True), ask(WORLD, obj, language, False)
      assert q.answer and q.answer in s.text and q.facts == s.facts


def test_mandarin_is_spoken_from_pinyin():
  for s in grammar.all_sentences(WORLD, "mandarin", False)[:50]:
    assert re.fullmatch(r"[a-z0-9 ]+", s.spoken), s.spoken
