"""The trained phone encoder as one safetensors file, for the k-means tokenizer: its parameters
by dotted path, and in the header (`config`, JSON) what rebuilds it: the encoder section, the mel
bins and the phone inventory. No pickle; loading needs neither the run nor its config file."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from stepaudio_jax.data.phone_pairs import read_metadata
from stepaudio_jax.export.orbax_reader import ExportError, ModelReader
from stepaudio_jax.models.phone_encoder import PhoneEncoder, PhoneEncoderConfig, encoder_states

__all__ = ["encoder_states", "load_phone_encoder", "save_phone_encoder"]

FORMAT = "stepaudio_jax.phone_encoder.v1"


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}.{k}" if prefix else str(k)
    out.update(_flatten(v, name) if isinstance(v, dict) else {name: np.asarray(v, np.float32)})
  return out


def save_phone_encoder(checkpoint: str, path: str) -> dict:
  """Write the encoder of a phone_ctc run (RUN_DIR: its newest step, or RUN_DIR/checkpoints/
  <step>) to `path`; returns the header's config."""
  reader = ModelReader(checkpoint, kind="phone_encoder")
  pc = reader.config.phone_ctc
  try:
    meta = read_metadata(pc.train_path, "phone_ctc.train_path")
  except ValueError as e:
    raise ExportError(f"{checkpoint}: the run's {e}") from None
  config = {"format": FORMAT, "encoder": dataclasses.asdict(pc.encoder),
            "n_mels": int(meta["n_mels"]), "phones": json.loads(meta["phones"]),
            "step": reader.checkpoint.step}
  save_file(_flatten(reader.tree()), path, metadata={"config": json.dumps(config)})
  return config


def load_phone_encoder(path: str) -> PhoneEncoder:
  """The encoder `save_phone_encoder` wrote; `model.phones` and the header's inventory (read
  with `phone_encoder_config`) name its CTC classes."""
  config = phone_encoder_config(path)
  model = PhoneEncoder(PhoneEncoderConfig(**config["encoder"]), config["n_mels"],
                       len(config["phones"]), rngs=nnx.Rngs(0))
  with safe_open(path, "np") as f:
    stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
  state = nnx.state(model, nnx.Param)
  leaves, structure = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
  names = [".".join(str(k.key) for k in where) for where, _ in leaves]
  if set(names) != set(stored):
    missing, extra = sorted(set(names) - set(stored)), sorted(set(stored) - set(names))
    raise ExportError(f"{path}: its tensors do not match its config (missing {missing[:3]}, "
                      f"unexpected {extra[:3]})")
  for name, (_, want) in zip(names, leaves):
    if stored[name].shape != want.shape:
      raise ExportError(f"{path}: tensor {name} has shape {stored[name].shape}, its config "
                        f"builds {want.shape}")
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(
      structure, [jnp.asarray(stored[n]) for n in names]))
  nnx.update(model, state)
  return model


def phone_encoder_config(path: str) -> dict:
  """The header of a saved encoder: format, encoder section, n_mels, phones, step."""
  try:
    with safe_open(path, "np") as f:
      config = json.loads((f.metadata() or {}).get("config", "{}"))
  except (OSError, ValueError) as e:
    raise ExportError(f"{path}: not a readable safetensors file ({e})") from None
  if config.get("format") != FORMAT:
    raise ExportError(f"{path} is no saved phone encoder (write one with save_phone_encoder)")
  return config
