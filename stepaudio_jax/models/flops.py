"""Analytic FLOP and memory counts for MFU and for checking compiled memory.

FLOPs count model work only (no remat recompute), 2 per multiply-add:
  per token, forward:  2 * (matmul parameters of the LM, including the LM head)
                     + 4 * N * H * T_avg per layer for QK^T and AV, with T_avg = (T + 1) / 2
                       keys per query under the causal mask (packing is ignored: the kernels
                       and the XLA path compute every causal pair of the row)
  training = 3 x forward (backward is two matmuls per forward matmul).
The frozen image encoder adds its forward only; its projector adds 3x.
"""

import dataclasses

import jax.numpy as jnp

from stepaudio_jax.config import RunConfig
from stepaudio_jax.config.model import Step1Config, VisionConfig


def lm_matmul_params(model: Step1Config, lm_head: bool = True) -> int:
  d, h = model.hidden_size, model.head_dim
  attn = d * h * (2 * model.num_heads + 2 * model.num_kv_heads)
  mlp = 3 * d * model.intermediate_size
  return model.num_layers * (attn + mlp) + (d * model.vocab_size if lm_head else 0)


def train_flops_per_token(model: Step1Config, seq_len: int, lm_head: bool = True) -> float:
  """lm_head=False: a reward or value model (the backbone, its scalar head negligible)."""
  t_avg = (seq_len + 1) / 2
  attention = 4 * model.num_layers * model.num_heads * model.head_dim * t_avg
  return 3 * (2 * lm_matmul_params(model, lm_head) + attention)


def vision_train_flops_per_image(vision: VisionConfig, lm_width: int) -> float:
  if not vision.enabled:
    return 0.0
  p, e, m = vision.tokens_per_image, vision.hidden_size, vision.intermediate_size
  patch = 2 * p * vision.patch_size**2 * vision.channels * e
  layer = 2 * p * (4 * e * e + 2 * e * m) + 4 * p * p * e
  projector = 3 * 2 * p * (e * lm_width + lm_width * lm_width)
  return patch + vision.num_layers * layer + projector


def train_step_flops(cfg: RunConfig, batch_size: int) -> float:
  tokens = batch_size * cfg.train.seq_len
  images = batch_size * cfg.vision.max_images_per_sequence if cfg.vision.enabled else 0
  return (tokens * train_flops_per_token(cfg.model, cfg.train.seq_len)
          + images * vision_train_flops_per_image(cfg.vision, cfg.model.hidden_size))


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  params: float
  grads: float
  optimizer: float
  activations: float

  @property
  def total(self) -> float:
    return self.params + self.grads + self.optimizer + self.activations


def train_memory_estimate(cfg: RunConfig, micro_batch: int, devices: int = 1) -> MemoryEstimate:
  """Bytes per device: fp32 params, grads and Adam moments (sharded evenly), plus activations.

  Activations: the residual stream saved at each layer boundary (under remat), plus the live
  working set of one layer being recomputed: its matmul outputs and the T x T attention logits,
  probabilities and their gradient (the XLA path materialises them), plus the fp32 logits and
  their gradient.
  """
  m, t = cfg.model, cfg.train.seq_len
  n_params = m.num_params()
  cbytes = jnp.dtype(m.compute_dtype.value).itemsize
  tokens = micro_batch * t / devices
  saved = m.num_layers * tokens * m.hidden_size * cbytes
  width = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim * 2 + 3 * m.intermediate_size
  layer = tokens * (width + 4 * m.hidden_size) * cbytes
  scores = 3 * micro_batch * m.num_heads * t * t * 4 / devices
  logits = 2 * tokens * m.vocab_size * 4
  return MemoryEstimate(
      params=4.0 * n_params / devices,
      grads=4.0 * n_params / devices,
      optimizer=8.0 * n_params / devices,
      activations=saved + layer + scores + logits,
  )
