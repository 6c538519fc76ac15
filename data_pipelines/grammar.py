"""A tiny bilingual world and the sentences, questions and answers it licenses.

The corpus must be learnable end to end (ASR, TTS, spoken question -> text answer), so every
sentence comes from this closed grammar: arithmetic on the numbers 0..20 and facts about a few
objects (their colour and owner). Answers are computed here, never written by hand, so a test can
check them. Each Mandarin phrase carries its pinyin because Debian's espeak-ng `cmn` voice does
not read Chinese characters (it spells code points); the `yue` voice reads them, so Cantonese
sentences are spoken from the characters themselves.
"""

import dataclasses
import random
import zlib

LANGUAGES = ("english", "mandarin", "cantonese")

# (english, mandarin hanzi, mandarin pinyin, cantonese hanzi)
NUMBERS = (
    ("zero", "零", "ling2", "零"), ("one", "一", "yi1", "一"), ("two", "二", "er4", "二"),
    ("three", "三", "san1", "三"), ("four", "四", "si4", "四"), ("five", "五", "wu3", "五"),
    ("six", "六", "liu4", "六"), ("seven", "七", "qi1", "七"), ("eight", "八", "ba1", "八"),
    ("nine", "九", "jiu3", "九"), ("ten", "十", "shi2", "十"),
    ("eleven", "十一", "shi2 yi1", "十一"), ("twelve", "十二", "shi2 er4", "十二"),
    ("thirteen", "十三", "shi2 san1", "十三"), ("fourteen", "十四", "shi2 si4", "十四"),
    ("fifteen", "十五", "shi2 wu3", "十五"), ("sixteen", "十六", "shi2 liu4", "十六"),
    ("seventeen", "十七", "shi2 qi1", "十七"), ("eighteen", "十八", "shi2 ba1", "十八"),
    ("nineteen", "十九", "shi2 jiu3", "十九"), ("twenty", "二十", "er4 shi2", "二十"),
)
OBJECTS = (
    ("ball", "球", "qiu2", "波"), ("cup", "杯子", "bei1 zi5", "杯"), ("book", "书", "shu1", "書"),
    ("hat", "帽子", "mao4 zi5", "帽"), ("box", "盒子", "he2 zi5", "盒"),
    ("kite", "风筝", "feng1 zheng1", "風箏"), ("car", "车", "che1", "車"),
    ("bird", "鸟", "niao3", "雀仔"), ("bag", "包", "bao1", "袋"), ("chair", "椅子", "yi3 zi5", "櫈"),
)
COLOURS = (
    ("red", "红色", "hong2 se4", "紅色"), ("blue", "蓝色", "lan2 se4", "藍色"),
    ("green", "绿色", "lv4 se4", "綠色"), ("yellow", "黄色", "huang2 se4", "黃色"),
    ("black", "黑色", "hei1 se4", "黑色"), ("white", "白色", "bai2 se4", "白色"),
)
OWNERS = (
    ("Anna", "安娜", "an1 na4", "安娜"), ("Tom", "汤姆", "tang1 mu3", "湯姆"),
    ("Mia", "米娅", "mi3 ya4", "米婭"), ("Leo", "李奥", "li3 ao4", "李奧"),
)
OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
_OP_WORDS = {  # op -> (mandarin hanzi, pinyin, cantonese hanzi)
    "plus": ("加", "jia1", "加"), "minus": ("减", "jian3", "減"), "times": ("乘", "cheng2", "乘")}


@dataclasses.dataclass(frozen=True)
class Sentence:
  """One sentence: `text` is what the corpus stores, `spoken` what espeak-ng is given."""

  text: str
  spoken: str
  language: str  # one of LANGUAGES
  kind: str  # "statement" | "question"
  topic: str  # "arithmetic" | "colour" | "owner"
  answer: str = ""  # questions only: the short text answer
  facts: tuple[tuple[str, str | int], ...] = ()  # operands, object... for checks and metadata


def _word(entry: tuple[str, str, str, str], language: str) -> tuple[str, str]:
  """(text, spoken) of a lexicon entry in one language."""
  en, zh, py, yue = entry
  return {"english": (en, en), "mandarin": (zh, py), "cantonese": (yue, yue)}[language]


@dataclasses.dataclass(frozen=True)
class World:
  """Which colour each object has and who owns it; fixed by a seed so the corpus is stable."""

  colour: dict[int, int]  # object index -> colour index
  owner: dict[int, int]  # object index -> owner index

  @classmethod
  def make(cls, seed: int) -> "World":
    rng = random.Random(seed)
    return cls(colour={o: rng.randrange(len(COLOURS)) for o in range(len(OBJECTS))},
               owner={o: rng.randrange(len(OWNERS)) for o in range(len(OBJECTS))})


def arithmetic_pairs() -> list[tuple[str, int, int]]:
  """All (op, a, b) over 0..20 whose result stays in 0..20 (so the answer is a number word)."""
  return [(op, a, b) for op, f in OPS.items() for a in range(21) for b in range(21)
          if 0 <= f(a, b) <= 20 and (op != "times" or (a > 0 and b > 0))]


def arithmetic(op: str, a: int, b: int, language: str, question: bool) -> Sentence:
  """'what is three plus four' -> 'seven', or the statement 'three plus four is seven'."""
  c = OPS[op](a, b)
  (ta, sa), (tb, sb), (tc, sc) = (_word(NUMBERS[n], language) for n in (a, b, c))
  facts = (("op", op), ("a", a), ("b", b), ("result", c))
  if language == "english":
    text = f"what is {ta} {op} {tb}?" if question else f"{ta} {op} {tb} is {tc}."
    spoken = text
  else:
    zh, py, yue = _OP_WORDS[op]
    if language == "mandarin":
      text = f"{ta}{zh}{tb}等于几？" if question else f"{ta}{zh}{tb}等于{tc}。"
      spoken = f"{sa} {py} {sb} deng3 yu2 " + ("ji3" if question else sc)
    else:
      text = f"{ta}{yue}{tb}等於幾多？" if question else f"{ta}{yue}{tb}等於{tc}。"
      spoken = text
  return Sentence(text, spoken, language, "question" if question else "statement", "arithmetic",
                  tc if question else "", facts)


def colour_of(world: World, obj: int, language: str, question: bool) -> Sentence:
  """'what colour is the ball' -> 'red', or 'the ball is red'."""
  (to, so), (tc, sc) = _word(OBJECTS[obj], language), _word(COLOURS[world.colour[obj]], language)
  facts = (("object", OBJECTS[obj][0]), ("colour", COLOURS[world.colour[obj]][0]))
  if language == "english":
    text = f"what colour is the {to}?" if question else f"the {to} is {tc}."
    spoken = text
  elif language == "mandarin":
    text = f"{to}是什么颜色的？" if question else f"{to}是{tc}的。"
    spoken = f"{so} shi4 " + ("shen2 me yan2 se4 de5" if question else f"{sc} de5")
  else:
    text = f"{to}係乜嘢顏色㗎？" if question else f"{to}係{tc}嘅。"
    spoken = text
  return Sentence(text, spoken, language, "question" if question else "statement", "colour",
                  tc if question else "", facts)


def owner_of(world: World, obj: int, language: str, question: bool) -> Sentence:
  """'who owns the ball' -> 'Anna', or 'the ball belongs to Anna'."""
  (to, so), (tw, sw) = _word(OBJECTS[obj], language), _word(OWNERS[world.owner[obj]], language)
  facts = (("object", OBJECTS[obj][0]), ("owner", OWNERS[world.owner[obj]][0]))
  if language == "english":
    text = f"who owns the {to}?" if question else f"the {to} belongs to {tw}."
    spoken = text
  elif language == "mandarin":
    text = f"{to}是谁的？" if question else f"{to}是{tw}的。"
    spoken = f"{so} shi4 " + ("shei2 de5" if question else f"{sw} de5")
  else:
    text = f"{to}係邊個嘅？" if question else f"{to}係{tw}嘅。"
    spoken = text
  return Sentence(text, spoken, language, "question" if question else "statement", "owner",
                  tw if question else "", facts)


def all_sentences(world: World, language: str, question: bool) -> list[Sentence]:
  """Every sentence of one kind in one language (528 arithmetic + 20 world facts)."""
  out = [arithmetic(op, a, b, language, question) for op, a, b in arithmetic_pairs()]
  for obj in range(len(OBJECTS)):
    out.append(colour_of(world, obj, language, question))
    out.append(owner_of(world, obj, language, question))
  return out


def held_out(sentence: Sentence) -> bool:
  """Whether a sentence belongs to no training split: a tenth of the arithmetic facts (by a hash
  of op and operands, so the same facts in every language, statement and question alike); the
  twenty world facts are few enough that every split needs them."""
  if sentence.topic != "arithmetic":
    return False
  f = dict(sentence.facts)
  return zlib.crc32(f"{f['op']} {f['a']} {f['b']}".encode()) % 10 == 0


def paragraph(rng: random.Random, pool: list[Sentence], n: int) -> list[Sentence]:
  """n statements drawn from `pool`, world facts favoured so that they recur across the corpus."""
  facts = [s for s in pool if s.topic != "arithmetic"]
  return [rng.choice(facts if rng.random() < 0.5 else pool) for _ in range(n)]


def join(sentences: list[Sentence], spoken: bool = False) -> str:
  """Concatenate sentences the way the language writes them (spaces only in English)."""
  sep = " " if sentences and sentences[0].language == "english" else ""
  return (" " if spoken else sep).join(s.spoken if spoken else s.text for s in sentences)
