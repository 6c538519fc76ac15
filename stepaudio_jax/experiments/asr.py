"""ASR character error rate of a run's LM on held-out speech (report section 6.2.1).

The run's own held-out ASR shards (data.eval_shards.asr), rendered in the run's own codebook
mode, are prompted up to the assistant turn (templates.asr_prompt) and decoded greedily with the
KV-cache sampler until the turn ends; jiwer scores the decoded text against the transcripts:
CER = character edits / reference characters over all clips (spaces count as characters, and
Chinese is scored per character as it is written), per language, and per language and voice
where the records' metadata carry a "voice" ("english/unseen"). `greedy_transcripts` is the
decoder `stepaudio transcribe` shares.
"""

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jiwer
import numpy as np
from flax import nnx
from jaxtyping import Int

from stepaudio_jax.data.loader import RecordSource, resolve_shards
from stepaudio_jax.data.records import decode_checked
from stepaudio_jax.data.templates import TemplateContext, asr_prompt, template_context
from stepaudio_jax.export.orbax_reader import CheckpointReader, ExportError, load_run_config
from stepaudio_jax.export.score import load_lm
from stepaudio_jax.inference.decode import left_pad
from stepaudio_jax.inference.sampler import SamplingConfig, make_sampler
from stepaudio_jax.models.step1 import Step1


@dataclasses.dataclass(frozen=True)
class AsrResult:
  step: int
  clips: int
  cer: float  # over all clips
  cer_by_language: dict[str, float]
  examples: list[tuple[str, str]]  # (reference, hypothesis) of the first clips
  # "language/voice" -> CER, where the records' metadata say whose voice it is: "seen" (a
  # training voice, a held-out sentence) or "unseen" (a voice no training split uses)
  cer_by_group: dict[str, float] = dataclasses.field(default_factory=dict)


def greedy_transcripts(model: Step1, ctx: TemplateContext,
                       codes: Sequence[tuple[Int[np.ndarray, " L"], Int[np.ndarray, " S"]]],
                       max_new_tokens: int = 96, batch: int = 32) -> list[str]:
  """The LM's greedy transcript of each (linguistic, semantic) code pair: the ASR prompt in the
  run's codebook mode (templates.asr_prompt), decoded on the KV cache until the turn ends."""
  params = nnx.to_pure_dict(nnx.state(model))
  sampler = make_sampler(model)
  lay = ctx.layout
  sampling = SamplingConfig(max_new_tokens, temperature=0.0, eos_id=lay.eos_id, pad_id=lay.pad_id)
  batch = max(1, min(batch, len(codes)))
  texts = []
  for start in range(0, len(codes), batch):
    chunk = list(codes[start:start + batch])
    n = len(chunk)
    chunk = chunk + chunk[:1] * (batch - n)  # one compiled shape for every chunk
    prompts = left_pad([asr_prompt(ctx, ling, sem) for ling, sem in chunk], lay.pad_id)
    out = jax.device_get(sampler(params, prompts, sampling, jax.random.key(0)))
    for i in range(n):
      new = out.tokens[i, :int(out.lengths[i])].tolist()
      texts.append(ctx.tokenizer.decode([t for t in new if t != lay.eos_id]))
  return texts


def asr_cer(checkpoint: str, clips: int, max_new_tokens: int = 96, batch: int = 32,
            shown: int = 3) -> AsrResult:
  """Greedy transcripts of the first `clips` held-out ASR records of the run (or one of its
  checkpoint steps) and their CER against the references."""
  reader = CheckpointReader(checkpoint)
  cfg = load_run_config(reader.run_dir)
  globs = cfg.data.eval_shards.get("asr")
  if not globs:
    raise ExportError(f"{reader.run_dir} has no held-out ASR shards (data.eval_shards.asr); "
                      "ASR CER needs them")
  records = RecordSource(resolve_shards(list(globs)))
  ctx = template_context(cfg.data, cfg.tokens, cfg.vision)
  examples = [decode_checked(records[i][1], cfg.tokens, records[i][0])
              for i in range(min(clips, len(records)))]
  hyps = greedy_transcripts(load_lm(reader.step_dir), ctx,
                            [(ex.linguistic[0], ex.semantic[0]) for ex in examples],
                            max_new_tokens, batch)
  refs = [ctx.tokenizer.decode(ex.text[0].tolist()) for ex in examples]
  metadata = [ex.metadata for ex in examples]
  return AsrResult(reader.step, len(examples), _cer(refs, hyps),
                   cer_by(refs, hyps, metadata, ("language",)), list(zip(refs, hyps))[:shown],
                   cer_by(refs, hyps, metadata, ("language", "voice")))


def cer_by(refs: list[str], hyps: list[str], metadata: list[dict], keys: tuple[str, ...]
           ) -> dict[str, float]:
  """CER per group of clips with equal metadata values of `keys`, named "v1/v2/..." (a missing
  language is "unknown"); {} when some key other than the language is in no clip's metadata."""
  if any(k != "language" and not any(k in m for m in metadata) for k in keys):
    return {}
  groups: dict[str, tuple[list[str], list[str]]] = {}
  for ref, hyp, meta in zip(refs, hyps, metadata):
    name = "/".join(str(meta.get(k, "unknown")) for k in keys)
    groups.setdefault(name, ([], []))
    groups[name][0].append(ref)
    groups[name][1].append(hyp)
  return {k: _cer(*v) for k, v in sorted(groups.items())}


def _cer(refs: list[str], hyps: list[str]) -> float:
  # jiwer rejects empty references; an empty hypothesis is all deletions, as it should be.
  kept = [(r, h) for r, h in zip(refs, hyps) if r]
  return float(jiwer.cer([r for r, _ in kept], [h for _, h in kept]))


def cached_asr_cer(run_dir: str, clips: int) -> dict:
  """asr_cer of the run's newest checkpoint as a dict, kept in RUN_DIR/asr-CLIPS.json for that
  step: reports over a growing sweep decode each finished run once."""
  path = os.path.join(run_dir, f"asr-{clips}.json")
  step = CheckpointReader(run_dir).step
  if os.path.isfile(path):
    with open(path) as f:
      cached = json.load(f)
    if cached["step"] == step:
      return cached
  print(f"ASR: greedy transcripts of {clips} held-out clips by {run_dir} (step {step})",
        flush=True)
  result = dataclasses.asdict(asr_cer(run_dir, clips))
  with open(path, "w") as f:
    json.dump(result, f)
  return result
