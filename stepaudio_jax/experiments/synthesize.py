"""`stepaudio synthesize`: text (with optional instruction tags and voice prompt) -> WAV.

  1. TTS LM (a `task: sft` run on TTS records): the prompt is the SFT TTS format up to the
     target audio (data/templates.py renders it from a record with empty target audio), with
     the leading "(tag)(tag)" instruction of the text as the record's instruction and, with a
     voice prompt, its transcript and codes (by the LM run's data.audio_tokenizer, else the
     committed corpus's) as the first exchange; the sampler (inference/sampler.py) continues
     until <|EOT|>.
  2. Its audio ids minus the linguistic offset are the one-stream codes (linguistic 0..1023,
     semantic 1024..5119); they are regrouped 2:3 in order (a stray id out of pattern only
     shortens the stream).
  3. Flow (codes -> mel, speaker vector and prompt mel from the voice prompt), vocoder (mel ->
     wave), WAV at the mel sample rate.
"""

import os
import re
import time
from math import gcd

import jax
import numpy as np
from flax import nnx
from jaxtyping import Float, Int
from scipy.io import wavfile
from scipy.signal import resample_poly

from data_pipelines import audio
from data_pipelines.speak import LANGUAGE_TAGS, SPEEDS
from data_pipelines.tokenizer import load_tokenizer
from stepaudio_jax.audio.codes import interleave_codes
from stepaudio_jax.config import RunConfig
from stepaudio_jax.config.model import TokenLayout
from stepaudio_jax.data.records import Example
from stepaudio_jax.data.templates import render, template_context
from stepaudio_jax.export.orbax_reader import ExportError, load_run_config
from stepaudio_jax.export.score import load_lm
from stepaudio_jax.export.speech_layout import is_export, read_export
from stepaudio_jax.inference.decode import left_pad
from stepaudio_jax.inference.sampler import SamplingConfig, make_sampler
from stepaudio_jax.inference.speech import SpeechDecoder, SynthesisError
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.checkpoint import restore_deliverable

# The committed corpus's audio tokenizer: voice prompts of an LM run whose config names none
# (data.audio_tokenizer) are coded with it.
TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "..", "data_pipelines", "corpus",
                         "audio_tokenizer.safetensors")
_TAGS = re.compile(r"^\s*((?:\([^()]*\)\s*)*)(.*)$", re.DOTALL)
# The instruction tags of the TTS corpus (data_pipelines/build_corpus.py writes a language tag,
# then a speed tag unless the speed is normal): the only ones a TTS LM trained here has seen.
KNOWN_TAGS = {"language": tuple(LANGUAGE_TAGS.values()),
              "speed": tuple(s for s in SPEEDS if s != "normal")}


def _decoder_part(path: str, kind: str) -> tuple[RunConfig, dict]:
  """(config, parameters) of a `task: <kind>` run directory's newest checkpoint, or of its
  export (`stepaudio export`)."""
  if is_export(path):
    return read_export(path, kind)
  config = os.path.join(path, "config.yaml")
  if not os.path.isfile(config):
    raise ExportError(f"--{kind} {path}: neither a run directory (no config.yaml) nor an export "
                      "(no config.json)")
  cfg = load_config(config)
  if cfg.task != kind:
    swapped = " (--flow and --vocoder swapped?)" if cfg.task in ("flow", "vocoder") else ""
    raise SynthesisError(f"--{kind} {path} is a task: {cfg.task} run, not a task: {kind} "
                         f"run{swapped}")
  _, params = restore_deliverable(path, f"--{kind}")
  return cfg, params


def load_decoder(flow: str, vocoder: str) -> SpeechDecoder:
  """A flow model and a vocoder, each from its run directory or its export."""
  (flow_cfg, flow_params), (voc_cfg, voc_params) = (_decoder_part(flow, "flow"),
                                                    _decoder_part(vocoder, "vocoder"))
  return SpeechDecoder.from_params(flow_cfg, voc_cfg, flow_params, voc_params)


def split_tags(text: str) -> tuple[str, str]:
  """'(English)(slow 1) one plus one.' -> ('(English)(slow 1)', 'one plus one.'); tags outside
  KNOWN_TAGS, two of one kind, or no words after them are refused."""
  tags, body = _TAGS.match(text).groups()
  found = re.findall(r"\(([^()]*)\)", tags)
  if not body.strip():
    raise SynthesisError(f"nothing to say in {text!r}: give the words to speak after any "
                         "instruction tags, e.g. \"(English) one plus one is two.\"")
  kind = {tag: k for k, known in KNOWN_TAGS.items() for tag in known}
  unknown = [t for t in found if t not in kind]
  if unknown:
    known = "; ".join(f"{k}: " + ", ".join(f"({t})" for t in ts) for k, ts in KNOWN_TAGS.items())
    raise SynthesisError(f"unknown instruction tag{'s' * (len(unknown) > 1)} "
                         f"{', '.join(f'({t})' for t in unknown)} in {text!r}; the TTS corpus "
                         f"knows {known}")
  kinds = [kind[t] for t in found]
  twice = sorted({k for k in kinds if kinds.count(k) > 1})
  if twice:
    raise SynthesisError(f"instruction tags {tags.strip()!r} give more than one {twice[0]}; "
                         f"keep one of {', '.join(f'({t})' for t in KNOWN_TAGS[twice[0]])}")
  return "".join(f"({t})" for t in found), body.strip()


def codes_from_tokens(tokens: Int[np.ndarray, " N"], layout: TokenLayout) -> Int[np.ndarray, " C"]:
  """The LM's audio ids as one stream of whole 2:3 groups (text ids and EOS are dropped)."""
  t = np.asarray(tokens)
  ling = t[(t >= layout.linguistic_offset) & (t < layout.semantic_offset)]
  sem = t[(t >= layout.semantic_offset) & (t < layout.image_placeholder_id)]
  return interleave_codes(ling - layout.linguistic_offset, sem - layout.semantic_offset)


def no_codes_error(tokens: Int[np.ndarray, " N"], truncated: bool, layout: TokenLayout,
                   lm_run: str, max_new_tokens: int) -> SynthesisError:
  """Why an LM answer (`tokens`, EOS included) holds no whole 2:3 group: it stopped at <|EOT|>
  (the LM or its prompt is off) or was cut at --max-new-tokens (`truncated`)."""
  t = np.asarray(tokens)
  ling = int(((t >= layout.linguistic_offset) & (t < layout.semantic_offset)).sum())
  sem = int(((t >= layout.semantic_offset) & (t < layout.image_placeholder_id)).sum())
  got = f"{ling} linguistic and {sem} semantic ids; a group is 2 and 3"
  if truncated:
    return SynthesisError(f"the LM of {lm_run} was cut at --max-new-tokens={max_new_tokens} "
                          f"with no whole 2:3 group of audio codes ({got}): raise "
                          "--max-new-tokens, or train the TTS LM longer")
  return SynthesisError(f"the LM of {lm_run} stopped at <|EOT|> after {len(t)} tokens with no "
                        f"whole 2:3 group of audio codes ({got}): the TTS LM is undertrained "
                        "(train it longer) or the prompt is off (its tags, voice prompt, "
                        "--speaker)")


def read_wav(path: str) -> tuple[int, Float[np.ndarray, " T"]]:
  """(sample rate, mono float32 samples) of a WAV file; a SynthesisError for another format or
  no samples."""
  try:
    sr, pcm = wavfile.read(path)
  except ValueError as e:
    raise SynthesisError(f"--prompt-wav {path} is not a WAV file ({e}); convert it, e.g. "
                         f"ffmpeg -i {path} prompt.wav") from None
  if not pcm.size:
    raise SynthesisError(f"--prompt-wav {path} holds no samples; give a few seconds of speech")
  x = audio.to_float(pcm)
  return sr, x.mean(axis=1) if x.ndim == 2 else x


def resample(x: Float[np.ndarray, " T"], sr: int, sample_rate: int) -> Float[np.ndarray, " S"]:
  """`x` at `sr` Hz resampled to `sample_rate` Hz."""
  if sr != sample_rate:
    g = gcd(sr, sample_rate)
    x = resample_poly(x, sample_rate // g, sr // g).astype(np.float32)
  return x


def synthesize(lm_run: str, flow_run: str, vocoder_run: str, text: str, out: str,
               prompt_wav: str = "", prompt_text: str = "", speaker: str = "default",
               max_new_tokens: int = 400, temperature: float = 0.7, top_k: int = 50,
               seed: int = 0, say=print) -> dict:
  """Write the WAV of `text` to `out`; returns what was done (tokens, codes, seconds)."""
  if bool(prompt_wav) != bool(prompt_text):
    raise SynthesisError("a voice prompt needs both --prompt-wav and --prompt-text (its "
                         "transcript: the TTS format pairs prompt text with prompt speech)")
  start = time.perf_counter()
  tags, body = split_tags(text)
  prompt_sr, prompt_x = read_wav(prompt_wav) if prompt_wav else (0, None)
  run_cfg = load_run_config(lm_run)
  ctx = template_context(run_cfg.data, run_cfg.tokens, run_cfg.vision)
  say(f"[1/4] text {body!r}, tags {tags or '(none)'}; loading the LM, flow and vocoder")
  dec = load_decoder(flow_run, vocoder_run)
  sr = dec.flow_cfg.mel.sample_rate
  empty = np.zeros(0, np.int32)
  texts, ling, sem = [ctx.tokenizer.encode(body)], [empty], [empty]
  prompt_codes, wave22 = None, None
  if prompt_wav:
    wave22 = resample(prompt_x, prompt_sr, sr)
    tok = load_tokenizer(run_cfg.data.audio_tokenizer or TOKENIZER)
    w16 = audio.prepare(wave22, sr)
    pl, ps = tok.linguistic(w16), tok.semantic(w16)
    prompt_codes = interleave_codes(pl, ps)
    if not len(prompt_codes):
      raise SynthesisError(f"--prompt-wav {prompt_wav} holds {len(prompt_x) / prompt_sr:.2f} s, "
                           "less than one 120 ms code group; give a few seconds of speech")
    texts, ling, sem = [ctx.tokenizer.encode(prompt_text)] + texts, [pl, empty], [ps, empty]
  record = Example("tts", texts, ling, sem, None,
                   {"speaker": speaker, **({"instruction": tags} if tags else {})})
  prompt = render(record, ctx).tokens.tolist()
  model = load_lm(lm_run)
  ids = run_cfg.tokens
  sampling = SamplingConfig(max_new_tokens, temperature, top_k, eos_id=ids.eos_id,
                            pad_id=ids.pad_id)
  sampler = make_sampler(model)
  t0 = time.perf_counter()
  result = jax.device_get(sampler(nnx.to_pure_dict(nnx.state(model)), left_pad([prompt]),
                                  sampling, jax.random.key(seed)))
  n = int(result.lengths[0])
  codes = codes_from_tokens(result.tokens[0, :n], ids)
  say(f"[2/4] LM: {n} tokens in {time.perf_counter() - t0:.1f} s (prompt {len(prompt)}), "
      f"{len(codes) // 5} code groups = {len(codes) // 5 * 0.12:.2f} s of speech")
  if not len(codes):
    raise no_codes_error(result.tokens[0, :n], bool(result.truncated[0]), ids, lm_run,
                         max_new_tokens)
  t0 = time.perf_counter()
  spk = dec.speaker(wave22) if wave22 is not None else np.zeros(
      dec.flow_cfg.speech_data.speaker_dim, np.float32)
  mel = dec.mel(codes, spk, jax.random.key(seed + 1), prompt_codes, wave22)
  say(f"[3/4] flow: {len(mel)} mel frames, {dec.flow_cfg.flow.steps} Euler steps, "
      f"guidance {dec.flow_cfg.flow.cfg_rate}, in {time.perf_counter() - t0:.1f} s")
  t0 = time.perf_counter()
  wave = dec.wave(mel)
  if not np.all(np.isfinite(wave)):
    raise FloatingPointError("the vocoder produced non-finite samples")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  wavfile.write(out, sr, (np.clip(wave, -1, 1) * 32767).astype(np.int16))
  say(f"[4/4] vocoder: {len(wave)} samples ({len(wave) / sr:.2f} s at {sr} Hz) in "
      f"{time.perf_counter() - t0:.1f} s -> {out} (total {time.perf_counter() - start:.1f} s)")
  return {"tokens": n, "code_groups": len(codes) // 5, "samples": len(wave), "sample_rate": sr}
