"""`stepaudio transcribe`: WAV files -> the run's audio tokenizer -> its LM, greedy -> text.

Each file, at any sample rate and channel count, is brought to 16 kHz mono peak-normalised
(data_pipelines.audio.prepare) and coded by the run's own audio tokenizer (data.audio_tokenizer,
the file that made its shards); the codes are prompted as the run's ASR records are (its
codebook mode and ASR system prompt) and decoded greedily on the KV cache in batches, by the
decoder the held-out CER uses (experiments/asr.py greedy_transcripts).
"""

import dataclasses
import os

import numpy as np
from jaxtyping import Float, Int
from scipy.io import wavfile

from data_pipelines import audio
from data_pipelines.tokenizer import AudioTokenizer, load_tokenizer
from stepaudio_jax.config import RunConfig
from stepaudio_jax.data.templates import asr_prompt, template_context
from stepaudio_jax.experiments.asr import greedy_transcripts
from stepaudio_jax.export.orbax_reader import CheckpointReader, ExportError, load_run_config
from stepaudio_jax.export.score import load_lm

GROUP_MS = 120  # one 2:3 group of linguistic (60 ms) and semantic (40 ms) codes


@dataclasses.dataclass(frozen=True)
class Transcript:
  audio: str  # the WAV file as given
  text: str


def read_wav16k(path: str) -> Float[np.ndarray, " T"]:
  """A WAV file as 16 kHz mono peak-normalised float32; an ExportError for a missing file,
  another format or too little audio for one code group."""
  if not os.path.isfile(path):
    raise ExportError(f"{path} does not exist; pass WAV files")
  try:
    sr, pcm = wavfile.read(path)
  except ValueError as e:
    raise ExportError(f"{path} is not a WAV file ({e}); convert it, e.g. ffmpeg -i {path} "
                      f"{os.path.splitext(os.path.basename(path))[0]}.wav") from None
  wave = audio.prepare(pcm, sr)
  if len(wave) < audio.SAMPLE_RATE * GROUP_MS // 1000:
    raise ExportError(f"{path} holds {len(wave) / audio.SAMPLE_RATE:.3f} s, less than one "
                      f"{GROUP_MS} ms code group; give at least a second of speech")
  return wave


def run_audio_tokenizer(cfg: RunConfig, run_dir: str) -> AudioTokenizer:
  """The run's data.audio_tokenizer, checked against its token layout."""
  spec = cfg.data.audio_tokenizer
  if not spec:
    raise ExportError(f"{run_dir} names no audio tokenizer (data.audio_tokenizer in its "
                      "config.yaml is empty): train with data.audio_tokenizer set to the "
                      "AudioTokenizer file that made its shards")
  try:
    tok = load_tokenizer(spec)
  except (OSError, ValueError) as e:
    raise ExportError(f"data.audio_tokenizer of {run_dir}: {e}") from None
  lay = cfg.tokens
  if tok.linguistic_codes > lay.linguistic_codes or tok.semantic_codes > lay.semantic_codes:
    raise ExportError(f"data.audio_tokenizer {spec} has {tok.linguistic_codes} linguistic and "
                      f"{tok.semantic_codes} semantic codes, more than the {lay.linguistic_codes} "
                      f"and {lay.semantic_codes} of {run_dir}'s token layout")
  return tok


def audio_codes(tok: AudioTokenizer, wave16k: Float[np.ndarray, " T"]
                ) -> tuple[Int[np.ndarray, " L"], Int[np.ndarray, " S"]]:
  """(linguistic, semantic) codes of a 16 kHz wave."""
  return tok.linguistic(wave16k), tok.semantic(wave16k)


def transcribe(checkpoint: str, wavs: list[str], max_new_tokens: int = 96,
               batch: int = 32) -> list[Transcript]:
  """Greedy transcripts of `wavs` by a run (its newest complete step) or one checkpoint step."""
  if max_new_tokens < 1:
    raise ExportError(f"--max-new-tokens {max_new_tokens} must be >= 1")
  reader = CheckpointReader(checkpoint)
  cfg = load_run_config(reader.run_dir)
  tok = run_audio_tokenizer(cfg, reader.run_dir)
  codes = [audio_codes(tok, read_wav16k(path)) for path in wavs]
  ctx = template_context(cfg.data, cfg.tokens, cfg.vision)
  longest = cfg.model.max_seq_len
  for path, (ling, sem) in zip(wavs, codes):
    n = len(asr_prompt(ctx, ling, sem))
    if n + max_new_tokens > longest:
      raise ExportError(f"{path}: its prompt ({n} ids) and --max-new-tokens {max_new_tokens} "
                        f"exceed the model's max_seq_len {longest}; cut the file shorter or "
                        "lower --max-new-tokens")
  texts = greedy_transcripts(load_lm(reader.step_dir), ctx, codes, max_new_tokens, batch)
  return [Transcript(path, text) for path, text in zip(wavs, texts)]
