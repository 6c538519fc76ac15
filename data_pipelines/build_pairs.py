"""Preference pairs for the reward model, from the committed corpus's AQTA records:
  python -m data_pipelines.build_pairs --corpus data_pipelines/corpus

For every AQTA record (a spoken question and its answer) two `preference` records: a TQTA pair
(the question as text, report stage 1) and an AQTA pair (the question as audio, stage 2). The
chosen answer is the record's own; the rejected one is the answer of the next record (in a fixed
shuffle) whose answer differs, so the preference is "answers the question asked". Written to
CORPUS/preference/{tqta,aqta}/{train,eval}-00000-of-00001.array_record, the splits those of the
AQTA records. Deterministic: the same corpus gives the same bytes.
"""

import argparse
import glob
import os

import numpy as np

from stepaudio_jax.config.model import TokenLayout
from stepaudio_jax.data import records
from stepaudio_jax.data.tokenizer import SentencePieceTokenizer

EMPTY = np.zeros(0, np.int32)


def _read(pattern: str) -> list[records.Example]:
  from array_record.python import array_record_data_source

  out = []
  for path in sorted(glob.glob(pattern)):
    source = array_record_data_source.ArrayRecordDataSource([path])
    out += [records.decode(source[i]) for i in range(len(source))]
  return out


def pairs(aqta: list[records.Example], tokenizer, seed: int = 0
          ) -> tuple[list[records.Example], list[records.Example]]:
  """(TQTA pairs, AQTA pairs) of AQTA records (see the module docstring)."""
  order = np.random.default_rng(seed).permutation(len(aqta))
  tqta, spoken = [], []
  for k, i in enumerate(order):
    ex = aqta[i]
    chosen = ex.text[-1]
    rejected = next(aqta[j].text[-1] for j in np.roll(order, -k - 1)
                    if not np.array_equal(aqta[j].text[-1], chosen))
    history = list(ex.text[:-2])
    quiet = [EMPTY] * len(history)
    meta = {k: v for k, v in ex.metadata.items() if k in ("language", "topic", "split")}
    question = np.asarray(tokenizer.encode(str(ex.metadata["question"])), np.int32)
    tqta.append(records.Example(records.PREFERENCE, history + [question, chosen, rejected],
                                quiet + [EMPTY] * 3, quiet + [EMPTY] * 3, None, meta))
    spoken.append(records.Example(
        records.PREFERENCE, history + [EMPTY, chosen, rejected],
        quiet + [ex.linguistic[-2], EMPTY, EMPTY], quiet + [ex.semantic[-2], EMPTY, EMPTY], None,
        meta))
  return tqta, spoken


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--corpus", default="data_pipelines/corpus")
  args = p.parse_args(argv)
  tokenizer = SentencePieceTokenizer(os.path.join(args.corpus, "spm_unigram.model"),
                                     TokenLayout(1024, 1024, 4096))
  for split in ("train", "eval"):
    tqta, spoken = pairs(_read(os.path.join(args.corpus, "aqta", f"{split}-*.array_record")),
                         tokenizer)
    for name, examples in (("tqta", tqta), ("aqta", spoken)):
      out = os.path.join(args.corpus, "preference", name)
      os.makedirs(out, exist_ok=True)
      n = records.write_shard(os.path.join(out, f"{split}-00000-of-00001.array_record"),
                              examples)
      print(f"{name} {split}: {n} pairs")


if __name__ == "__main__":
  main()
