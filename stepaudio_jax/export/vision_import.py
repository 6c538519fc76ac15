"""Hugging Face SigLIP vision towers -> our VisionEncoder parameters.

Our encoder has SigLIP's structure (patch conv with bias, learned position embedding, pre-norm
layers with biased q/k/v/out projections, gelu-tanh MLP, post LayerNorm), so the import is a
relayout: Linear weights [out, in] -> [in, out]; the patch conv [E, C, p, p] -> [p*p*C, E] in
our (py, px, c) patch order; layers stacked on a leading axis. SigLIP's attention-pooling head
is not used (the LM reads every patch feature) and is skipped. CLIP towers differ (class token,
pre-LayerNorm, quick-gelu, no patch bias) and are rejected with that reason.
"""

import json
import os

import numpy as np

from stepaudio_jax.export.orbax_reader import ExportError
from stepaudio_jax.export.safetensors_io import SafetensorsDir

PATCH = "embeddings.patch_embedding.weight"
LINEARS = {  # ours: SigLIP name under encoder.layers.{i}.
    "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
    "wo": "self_attn.out_proj", "w1": "mlp.fc1", "w2": "mlp.fc2",
}
BIASES = {"bq": "self_attn.q_proj", "bk": "self_attn.k_proj", "bv": "self_attn.v_proj",
          "bo": "self_attn.out_proj", "b1": "mlp.fc1", "b2": "mlp.fc2"}
NORMS = {"norm1": "layer_norm1", "norm2": "layer_norm2"}


def siglip_vision_config(directory: str) -> dict:
  """The vision part of config.json as `vision.*` overrides (a full SiglipModel works too)."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise ExportError(f"{path} does not exist; point --vision at a saved SigLIP vision model")
  with open(path) as f:
    hf = json.load(f)
  hf = hf.get("vision_config", hf)
  kind = hf.get("model_type", "")
  if kind.startswith("clip"):
    raise ExportError(
        f"{path}: CLIP vision towers (class token, pre-LayerNorm, quick-gelu) do not match "
        "VisionEncoder; only SigLIP imports"
    )
  if not kind.startswith("siglip"):
    raise ExportError(f"{path}: model_type {kind!r} is not a SigLIP vision model")
  if hf.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
    raise ExportError(f"{path}: hidden_act={hf['hidden_act']!r}; VisionEncoder uses gelu-tanh")
  return {
      "vision.enabled": True,
      "vision.image_size": hf["image_size"],
      "vision.patch_size": hf["patch_size"],
      "vision.channels": hf.get("num_channels", 3),
      "vision.hidden_size": hf["hidden_size"],
      "vision.num_layers": hf["num_hidden_layers"],
      "vision.num_heads": hf["num_attention_heads"],
      "vision.intermediate_size": hf["intermediate_size"],
      "vision.layer_norm_eps": hf.get("layer_norm_eps", 1e-6),
  }


def siglip_vision_params(directory: str, num_layers: int) -> dict:
  """VisionEncoder's pure parameter dict, float32, from the model's safetensors."""
  tensors = SafetensorsDir(directory)
  prefixes = [k[: -len(PATCH)] for k in tensors.keys() if k.endswith(PATCH)]
  if len(prefixes) != 1:
    raise ExportError(f"{directory}: expected one vision tower ({PATCH}), found {len(prefixes)}")
  pre = prefixes[0]

  def get(name: str) -> np.ndarray:
    if pre + name not in tensors:
      raise ExportError(f"{directory}: tensor {pre + name} is missing from the safetensors")
    return np.asarray(tensors.get(pre + name), np.float32)

  def stack(fn) -> np.ndarray:
    return np.stack([fn(f"encoder.layers.{i}.") for i in range(num_layers)])

  conv = get(PATCH)  # [E, C, py, px]
  e = conv.shape[0]
  layers: dict = {ours: stack(lambda p, n=name: get(p + n + ".weight").T)
                  for ours, name in LINEARS.items()}
  layers.update({ours: stack(lambda p, n=name: get(p + n + ".bias"))
                 for ours, name in BIASES.items()})
  layers.update({ours: {"scale": stack(lambda p, n=name: get(p + n + ".weight")),
                        "bias": stack(lambda p, n=name: get(p + n + ".bias"))}
                 for ours, name in NORMS.items()})
  return {
      "patch_w": conv.transpose(2, 3, 1, 0).reshape(-1, e),
      "patch_b": get("embeddings.patch_embedding.bias"),
      "pos_embed": get("embeddings.position_embedding.weight"),
      "layers": layers,
      "post_norm": {"scale": get("post_layernorm.weight"), "bias": get("post_layernorm.bias")},
  }
