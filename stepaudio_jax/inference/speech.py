"""Speech codes -> mel (flow, Euler + guidance) -> waveform (HiFi-GAN), from trained parameters
(experiments/synthesize.py:load_decoder reads them from run directories).

Codes are one stream of 2:3 groups (audio/codes.py), e.g. the LM's audio tokens minus the
linguistic offset. A voice prompt (its codes and wave) sets the speaker vector and is given to
the flow model as the condition: prompt codes are prepended, the prompt's mel fills the first
frames, and only the frames after it are returned (CosyVoice's inference).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Float, Int

from stepaudio_jax.audio.mel import log_mel
from stepaudio_jax.audio.codes import group_samples
from stepaudio_jax.audio.speaker import speaker_of
from stepaudio_jax.config import RunConfig
from stepaudio_jax.models.flow import FlowModel, solve
from stepaudio_jax.models.hifigan import Generator


class SynthesisError(ValueError):
  """Input that speech synthesis cannot use (text, voice prompt, the runs given), or an LM that
  gave no audio; the message names what and the fix (`stepaudio synthesize` prints it)."""


def _restored(build, params: dict) -> nnx.Module:
  """The module `build` makes, holding `params` (a run's trained tree) instead of an init."""
  graph, state = nnx.split(nnx.eval_shape(build))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graph, state)


@dataclasses.dataclass
class SpeechDecoder:
  flow_cfg: RunConfig
  vocoder_cfg: RunConfig
  flow: FlowModel
  generator: Generator

  @classmethod
  def from_params(cls, flow_cfg: RunConfig, vocoder_cfg: RunConfig, flow_params: dict,
                  generator_params: dict) -> "SpeechDecoder":
    """From a `task: flow` and a `task: vocoder` run's configs and trained parameters
    (state.params["flow"], state.params["generator"])."""
    fc, vc = flow_cfg, vocoder_cfg
    if fc.task != "flow" or vc.task != "vocoder":
      swapped = " (swapped?)" if (fc.task, vc.task) == ("vocoder", "flow") else ""
      raise SynthesisError(f"need a flow run and a vocoder run, got tasks {fc.task!r} and "
                           f"{vc.task!r}{swapped}")
    if fc.mel != vc.mel:
      raise SynthesisError(f"the flow run's mel settings {fc.mel} differ from the vocoder's "
                           f"{vc.mel}: train both with the same mel section")
    flow = _restored(lambda: FlowModel(fc.flow, fc.mel.n_mels, fc.speech_data.speaker_dim,
                                       rngs=nnx.Rngs(0)), flow_params)
    gen = _restored(lambda: Generator(vc.vocoder, vc.mel.n_mels, rngs=nnx.Rngs(0)),
                    generator_params)
    return cls(fc, vc, flow, gen)

  def speaker(self, wave: Float[np.ndarray, " T"]) -> Float[np.ndarray, " E"]:
    """The stand-in x-vector of a 22,050 Hz wave (audio/speaker.py)."""
    return speaker_of(wave, self.flow_cfg.mel, self.flow_cfg.speech_data.speaker_dim)

  def mel(self, codes: Int[np.ndarray, " N"], speaker: Float[np.ndarray, " E"],
          rng: jax.Array, prompt_codes: Int[np.ndarray, " P"] | None = None,
          prompt_wave: Float[np.ndarray, " W"] | None = None) -> Float[np.ndarray, "F M"]:
    """Log-mel frames of `codes` (whole groups of 5), after an optional voice prompt."""
    codes = np.asarray(codes, np.int32)
    if codes.ndim != 1 or len(codes) % 5 or not len(codes):
      raise ValueError(f"codes must be a non-empty 1-D stream of whole 2:3 groups (a multiple "
                       f"of 5), got shape {codes.shape}")
    if codes.min() < 0 or codes.max() >= self.flow_cfg.flow.vocab:
      raise ValueError(f"codes must lie in [0, {self.flow_cfg.flow.vocab}), got "
                       f"[{codes.min()}, {codes.max()}]")
    mc, fc = self.flow_cfg.mel, self.flow_cfg.flow
    step = group_samples(mc.sample_rate)
    p_frames, cond_mel = 0, None
    if prompt_codes is not None and len(prompt_codes):
      groups = len(prompt_codes) // 5
      prompt_wave = np.pad(prompt_wave, (0, max(groups * step - len(prompt_wave), 0)))
      p_frames = groups * step // mc.hop
      cond_mel = np.asarray(log_mel(jnp.asarray(prompt_wave[:groups * step])[None], mc))[0]
      codes = np.concatenate([np.asarray(prompt_codes[:groups * 5], np.int32), codes])
    frames = len(codes) // 5 * step // mc.hop
    cond = np.zeros((1, frames, mc.n_mels), np.float32)
    if cond_mel is not None:
      cond[0, :p_frames] = (cond_mel[:p_frames] - fc.mel_mean) / fc.mel_std
    out = _flow_mel(self.flow, jnp.asarray(codes)[None], jnp.asarray(speaker)[None],
                    jnp.asarray(cond), rng)
    return np.asarray(out)[0, p_frames:] * fc.mel_std + fc.mel_mean

  def wave(self, mel: Float[np.ndarray, "F M"]) -> Float[np.ndarray, " T"]:
    """The vocoder's 22,050 Hz wave of log-mel frames."""
    return np.asarray(_vocode(self.generator, jnp.asarray(mel, jnp.float32)[None]))[0]


@nnx.jit
def _flow_mel(model: FlowModel, codes, speaker, cond, rng):
  frames = cond.shape[1]
  n = jnp.full((1,), codes.shape[1])
  f = jnp.full((1,), frames)
  mu = model.encode(codes, n, f, frames)
  mask = jnp.ones((1, frames), bool)
  return solve(model, mu, mask, model.speaker(speaker), cond, rng)


@nnx.jit
def _vocode(model: Generator, mel):
  return model(mel)
