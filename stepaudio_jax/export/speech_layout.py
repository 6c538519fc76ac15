"""The flow model and vocoder generator <-> their public tensors (the PyTorch modules' names and
layouts in export/torch_speech.py), in numpy, both ways.

Names are the JAX paths joined by dots (`encoder.0.attn.qkv.weight`, `ups.1.weight`); layouts
(JAX -> torch): Dense [in, out] -> Linear [out, in]; LayerNorm scale -> weight; Conv1d
[k, in/groups, out] -> [out, in/groups, k]; the upsampling ConvTranspose1d (under `ups.`,
stored as the equivalent forward kernel [k, in, out]) -> [in, out, k] reversed in k; Conv2d
[kh, kw, in, out] -> [out, in, kh, kw]. The same rules run backwards for `from_public`.
"""

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from stepaudio_jax.config import RunConfig
from stepaudio_jax.config.speech import FlowConfig, MelConfig, SpeechDataConfig, VocoderConfig
from stepaudio_jax.export.orbax_reader import ExportError
from stepaudio_jax.export.safetensors_io import SafetensorsDir
from stepaudio_jax.models.flow import FlowModel
from stepaudio_jax.models.hifigan import Generator

ARCHITECTURES = {"flow": "StepAudioFlow", "vocoder": "StepAudioHiFiGAN"}


def _flatten(tree: dict, prefix: str = ""):
  for k, v in tree.items():
    name = f"{prefix}.{k}" if prefix else str(k)
    if isinstance(v, dict):
      yield from _flatten(v, name)
    else:
      yield name, v


def _rule(name: str, ndim: int) -> str:
  if name.endswith(".scale"):
    return "rename"
  if not name.endswith(".weight") or ndim < 2:
    return "same"
  if ndim == 3 and name.startswith("ups."):
    return "transposed_conv"
  return {2: "linear", 3: "conv1d", 4: "conv2d"}[ndim]


def public_tensors(tree: dict) -> dict[str, np.ndarray]:
  """A model's JAX parameter tree -> {public name: array in the torch layout}."""
  out = {}
  for name, a in _flatten(tree):
    a = np.asarray(a)
    rule = _rule(name, a.ndim)
    if rule == "rename":
      name = name[:-len("scale")] + "weight"
    elif rule == "linear":
      a = a.T
    elif rule == "transposed_conv":
      a = a[::-1].transpose(1, 2, 0)
    elif rule == "conv1d":
      a = a.transpose(2, 1, 0)
    elif rule == "conv2d":
      a = a.transpose(3, 2, 0, 1)
    out[name] = np.ascontiguousarray(a)
  return out


def from_public(tensors: dict[str, np.ndarray], like: dict) -> dict:
  """The inverse of public_tensors, shaped like the JAX tree `like` (its leaves give the
  names and shapes); a missing or misshapen tensor is a ValueError naming it."""
  def build(node: dict, prefix: str) -> dict:
    out = {}
    for k, v in node.items():
      name = f"{prefix}.{k}" if prefix else str(k)
      if isinstance(v, dict):
        out[k] = build(v, name)
        continue
      rule = _rule(name, len(v.shape))
      public = name[:-len("scale")] + "weight" if rule == "rename" else name
      if public not in tensors:
        raise ValueError(f"tensor {public} is missing")
      a = np.asarray(tensors[public])
      if rule == "linear":
        a = a.T
      elif rule == "transposed_conv":
        a = a.transpose(2, 0, 1)[::-1]
      elif rule == "conv1d":
        a = a.transpose(2, 1, 0)
      elif rule == "conv2d":
        a = a.transpose(2, 3, 1, 0)
      if a.shape != tuple(v.shape):
        raise ValueError(f"tensor {public} has shape {list(a.shape)}, the model needs "
                         f"{list(v.shape)} in the public layout")
      out[k] = np.ascontiguousarray(a)
    return out

  return build(like, "")


def _architecture(section) -> dict:
  """A section without its training options (the optimizers): what builds the model."""
  return {k: v for k, v in dataclasses.asdict(section).items() if not k.endswith("optimizer")}


def hf_config(kind: str, cfg: RunConfig, torch_dtype: str) -> dict:
  """config.json of a flow or vocoder export: its sections, all a loader needs to build it."""
  out = {"architectures": [ARCHITECTURES[kind]], "model_type": f"stepaudio_{kind}",
         "torch_dtype": torch_dtype, "mel": dataclasses.asdict(cfg.mel)}
  if kind == "flow":
    return out | {"flow": _architecture(cfg.flow), "speaker_dim": cfg.speech_data.speaker_dim}
  return out | {"vocoder": _architecture(cfg.vocoder)}


def is_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def read_export(directory: str, kind: str) -> tuple[RunConfig, dict]:
  """(a run config with the sections that build it, its JAX parameters) of a flow or vocoder
  export directory, so the speech decoder runs from exports as from runs."""
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    hf = json.load(f)
  if hf.get("architectures") != [ARCHITECTURES[kind]]:
    raise ExportError(f"{path}: architectures={hf.get('architectures')}, not "
                      f"{ARCHITECTURES[kind]}: is it the export of a {kind} run?")
  mel = MelConfig(**hf["mel"])
  if kind == "flow":
    sections = {"mel": mel, "speech_data": SpeechDataConfig(speaker_dim=hf["speaker_dim"]),
                "flow": FlowConfig(**hf["flow"])}
    build = lambda: FlowModel(sections["flow"], mel.n_mels, hf["speaker_dim"],  # noqa: E731
                              rngs=nnx.Rngs(0))
  else:
    sections = {"mel": mel, "vocoder": VocoderConfig(**hf["vocoder"])}
    build = lambda: Generator(sections["vocoder"], mel.n_mels, rngs=nnx.Rngs(0))  # noqa: E731
  like = nnx.to_pure_dict(nnx.state(nnx.eval_shape(build), nnx.Param))
  tensors = SafetensorsDir(directory)
  try:
    params = from_public({k: tensors.get(k) for k in tensors.keys()}, like)
  except ValueError as e:
    raise ExportError(f"{directory}: {e}; the export does not match its config.json") from None
  extra = set(tensors.keys()) - set(public_tensors(jax.tree.map(np.zeros_like, params)))
  if extra:
    raise ExportError(f"{directory}: tensors {sorted(extra)[:3]} are not part of the model")
  cfg = RunConfig(task=kind, sections=sections)
  return cfg, jax.tree.map(lambda a: a.astype(np.float32), params)
