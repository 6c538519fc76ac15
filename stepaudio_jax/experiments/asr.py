"""ASR character error rate of a run's LM on held-out speech (report section 6.2.1).

The run's own held-out ASR shards (data.eval_shards.asr), rendered in the run's own codebook
mode, are prompted up to the assistant turn (templates.asr_prompt) and decoded greedily with the
KV-cache sampler until the turn ends; jiwer scores the decoded text against the transcripts:
CER = character edits / reference characters over all clips (spaces count as characters, and
Chinese is scored per character as it is written).
"""

import dataclasses
import json
import os

import jax
import jiwer
from flax import nnx

from stepaudio_jax.data.loader import RecordSource, resolve_shards
from stepaudio_jax.data.records import decode_checked
from stepaudio_jax.data.templates import asr_prompt, template_context
from stepaudio_jax.export.orbax_reader import CheckpointReader, ExportError, load_run_config
from stepaudio_jax.export.score import load_lm
from stepaudio_jax.inference.decode import left_pad
from stepaudio_jax.inference.sampler import SamplingConfig, make_sampler


@dataclasses.dataclass(frozen=True)
class AsrResult:
  step: int
  clips: int
  cer: float  # over all clips
  cer_by_language: dict[str, float]
  examples: list[tuple[str, str]]  # (reference, hypothesis) of the first clips


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
  model = load_lm(reader.step_dir)
  params = nnx.to_pure_dict(nnx.state(model))
  sampler = make_sampler(model)
  lay = cfg.tokens
  sampling = SamplingConfig(max_new_tokens, temperature=0.0, eos_id=lay.eos_id, pad_id=lay.pad_id)
  refs, hyps = [], []
  for start in range(0, len(examples), batch):
    chunk = examples[start:start + batch]
    chunk = chunk + chunk[:1] * (batch - len(chunk))  # one compiled shape for every chunk
    prompts = left_pad([asr_prompt(ctx, ex.linguistic[0], ex.semantic[0]) for ex in chunk],
                       lay.pad_id)
    out = jax.device_get(sampler(params, prompts, sampling, jax.random.key(0)))
    for i, ex in enumerate(examples[start:start + batch]):
      new = out.tokens[i, :int(out.lengths[i])].tolist()
      hyps.append(ctx.tokenizer.decode([t for t in new if t != lay.eos_id]))
      refs.append(ctx.tokenizer.decode(ex.text[0].tolist()))
  by_language: dict[str, tuple[list[str], list[str]]] = {}
  for ex, ref, hyp in zip(examples, refs, hyps):
    lang = str(ex.metadata.get("language", "unknown"))
    by_language.setdefault(lang, ([], []))
    by_language[lang][0].append(ref)
    by_language[lang][1].append(hyp)
  return AsrResult(reader.step, len(examples), _cer(refs, hyps),
                   {k: _cer(*v) for k, v in sorted(by_language.items())},
                   list(zip(refs, hyps))[:shown])


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
