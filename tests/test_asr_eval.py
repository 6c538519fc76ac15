"""ASR CER of a run (experiments/asr.py): the prompt is the training format's prefix, the
transcripts equal greedy decoding by repeated full forward passes, the CER equals a plain
Python edit distance over the clips, and the CER per language and voice is jiwer's per group."""

import jiwer
import numpy as np
import pytest

from stepaudio_jax.data.loader import RecordSource, resolve_shards
from stepaudio_jax.data.records import decode_checked
from stepaudio_jax.data.templates import asr_prompt, render, template_context
from stepaudio_jax.experiments.asr import asr_cer, cer_by
from stepaudio_jax.export.score import load_lm
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.trainer import train

CLIPS, NEW = 3, 6


def _edits(a: str, b: str) -> int:
  row = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    prev, row[0] = row[0], i
    for j, cb in enumerate(b, 1):
      prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
  return row[-1]


@pytest.mark.slow
def test_asr_cer_is_greedy_decoding_scored_by_edit_distance(tmp_path):
  """In a single-codebook mode, so the prompt's audio is that mode's rendering."""
  cfg = load_config("configs/ablations/codebooks.yaml", [
      f"train.run_dir={tmp_path}", "train.steps=3", "train.eval_every=0", "checkpoint.every=3",
      "data.codebooks=linguistic"])
  train(cfg, print_fn=lambda *a, **k: None)
  result = asr_cer(str(tmp_path), CLIPS, max_new_tokens=NEW, batch=2, shown=CLIPS)

  ctx = template_context(cfg.data, cfg.tokens, cfg.vision)
  records = RecordSource(resolve_shards(cfg.data.eval_shards["asr"]))
  model = load_lm(str(tmp_path))
  edits = chars = 0
  for i in range(CLIPS):
    ex = decode_checked(records[i][1], cfg.tokens, records[i][0])
    prompt = asr_prompt(ctx, ex.linguistic[0], ex.semantic[0])
    segment = render(ex, ctx)  # the training row: the prompt, then the learned transcript
    np.testing.assert_array_equal(segment.tokens[:len(prompt)], prompt)
    assert (segment.types[len(prompt) - 1:] != 0).all()  # everything after it is learned
    ids = list(prompt)
    for _ in range(NEW):
      nxt = int(np.argmax(np.asarray(model(np.asarray([ids]))[0, -1])))
      ids.append(nxt)
      if nxt == cfg.tokens.eos_id:
        break
    hyp = ctx.tokenizer.decode([t for t in ids[len(prompt):] if t != cfg.tokens.eos_id])
    ref = ctx.tokenizer.decode(ex.text[0].tolist())
    assert result.examples[i] == (ref, hyp)
    edits, chars = edits + _edits(ref, hyp), chars + len(ref)
  np.testing.assert_allclose(result.cer, edits / chars, rtol=1e-12)


REFS = ["three plus four is seven.", "the ball is yellow.", "一加一等于二。", "five is five.",
        "二加二等于四。", "red box."]
HYPS = ["three plus for is seven", "the ball is yelow.", "一加二等于二。", "", "二加二等四。",
        "red box."]
META = [{"language": "english", "voice": "seen"}, {"language": "english", "voice": "unseen"},
        {"language": "mandarin", "voice": "unseen"}, {"language": "english", "voice": "seen"},
        {"language": "mandarin", "voice": "unseen"}, {"language": "english", "voice": "unseen"}]


def test_cer_by_group_is_jiwer_per_language_and_voice():
  want = {}
  for name in ("english/seen", "english/unseen", "mandarin/unseen"):
    lang, voice = name.split("/")
    kept = [i for i, m in enumerate(META) if (m["language"], m["voice"]) == (lang, voice)]
    want[name] = jiwer.cer([REFS[i] for i in kept], [HYPS[i] for i in kept])
  got = cer_by(REFS, HYPS, META, ("language", "voice"))
  assert list(got) == sorted(want)
  for name, cer in want.items():
    assert got[name] == pytest.approx(cer, rel=1e-12), name
  by_language = cer_by(REFS, HYPS, META, ("language",))
  assert by_language["mandarin"] == pytest.approx(jiwer.cer([REFS[2], REFS[4]], [HYPS[2], HYPS[4]]))


def test_cer_by_group_is_empty_without_voices():
  """Records without metadata["voice"] (shards built without voice tags) have no groups, only
  languages."""
  meta = [{"language": m["language"]} for m in META]
  assert cer_by(REFS, HYPS, meta, ("language", "voice")) == {}
  assert list(cer_by(REFS, HYPS, meta, ("language",))) == ["english", "mandarin"]
