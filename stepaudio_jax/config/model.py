"""Model sections: the Step1 LM (`model`), token layout (`tokens`), image encoder (`vision`)."""

import dataclasses
import enum

from stepaudio_jax.config.fields import coerce_enums


class Remat(str, enum.Enum):
  NONE = "none"  # keep every activation
  FULL = "full"  # keep only layer inputs
  SAVE_DOTS = "save_dots"  # keep matmul outputs without batch dims
  SAVE_QKV = "save_qkv"  # keep the q, k, v projections
  SAVE_ATTENTION = "save_attention"  # keep the attention context (skips re-running attention)
  # keep the SwiGLU gate and up projections and the residual after attention: the backward
  # re-runs only q/k/v and attention (0.6 GB per layer per 4,096-token row at the 130B width)
  SAVE_MLP = "save_mlp"


class PositionEncoding(str, enum.Enum):
  ALIBI_SQRT = "alibi_sqrt"  # Step1: bias -slope * sqrt(i - j), no RoPE
  ROPE = "rope"  # Llama-style ablation; exports as LlamaForCausalLM


class AttentionImpl(str, enum.Enum):
  XLA = "xla"
  PALLAS = "pallas"
  CUDNN = "cudnn"
  AUTO = "auto"  # pallas on TPU, else xla: the Triton kernels have never run on a GPU


class DType(str, enum.Enum):
  FLOAT32 = "float32"
  BFLOAT16 = "bfloat16"


@dataclasses.dataclass(frozen=True)
class Step1Config:
  """One Step1 LM. Defaults are Step-Audio-Chat (130B), facts.md section 1."""

  vocab_size: int = 74752
  hidden_size: int = 12288
  num_layers: int = 88
  num_heads: int = 96
  num_kv_heads: int = 8  # num_attention_groups in the public config
  head_dim: int = 128
  intermediate_size: int = 31232
  max_seq_len: int = 32768
  rms_norm_eps: float = 1e-5
  position_encoding: PositionEncoding = PositionEncoding.ALIBI_SQRT
  rope_theta: float = 10000.0
  attention: AttentionImpl = AttentionImpl.XLA
  # Attention tiles: query rows per block (the pallas kernels and the xla path) and key rows
  # per block (pallas); 0 takes the backend's default (kernels.DEFAULT_BLOCKS, XLA_QUERY_BLOCKS).
  attention_block_q: int = 0
  attention_block_k: int = 0
  remat: Remat = Remat.FULL
  scan_layers: bool = True
  param_dtype: DType = DType.FLOAT32
  compute_dtype: DType = DType.BFLOAT16
  init_std: float = 0.02

  def __post_init__(self):
    coerce_enums(self)
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "intermediate_size", "max_seq_len", "rms_norm_eps", "rope_theta",
                 "init_std"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    for name in ("attention_block_q", "attention_block_k"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0 (0: the backend's default), got "
                         f"{getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
      )
    if self.position_encoding == PositionEncoding.ROPE and self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rope")

  def num_params(self, include_embedding: bool = True) -> int:
    d, f = self.hidden_size, self.intermediate_size
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    layer = attn + 3 * d * f + 2 * d
    embed = 2 * self.vocab_size * d if include_embedding else 0
    return self.num_layers * layer + d + embed


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """Where each kind of token lives in the vocabulary."""

  text_vocab_size: int = 65536  # sentencepiece ids stay below this
  linguistic_codes: int = 1024  # 16.7 Hz codebook
  semantic_codes: int = 4096  # 25 Hz codebook
  bos_id: int = 1
  eos_id: int = 3  # also <|EOT|>
  pad_id: int = 0
  bot_id: int = 4  # <|BOT|>

  def __post_init__(self):
    if self.text_vocab_size <= 0:
      raise ValueError(f"text_vocab_size must be positive, got {self.text_vocab_size}")
    if self.linguistic_codes < 0 or self.semantic_codes < 0:
      raise ValueError("linguistic_codes and semantic_codes must be >= 0 (0 for a text-only model)")
    if max(self.bos_id, self.eos_id, self.pad_id, self.bot_id) >= self.text_vocab_size:
      raise ValueError("special token ids must lie inside the text vocabulary")

  @property
  def linguistic_offset(self) -> int:
    return self.text_vocab_size

  @property
  def semantic_offset(self) -> int:
    return self.text_vocab_size + self.linguistic_codes

  @property
  def audio_tokens(self) -> int:
    return self.linguistic_codes + self.semantic_codes

  @property
  def image_placeholder_id(self) -> int:
    """First reserved id after the audio block; marks where image features go."""
    return self.semantic_offset + self.semantic_codes

  def min_vocab_size(self, with_images: bool) -> int:
    """Ids the model must be able to emit: text, audio codes and, with images, the placeholder."""
    return self.image_placeholder_id + int(with_images)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Encoder shape; defaults are a ViT-L/14 at 224 px (256 patches per image)."""

  enabled: bool = False
  image_size: int = 224
  patch_size: int = 14
  channels: int = 3
  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  intermediate_size: int = 4096
  layer_norm_eps: float = 1e-6
  max_images_per_sequence: int = 1

  def __post_init__(self):
    for name in ("image_size", "patch_size", "channels", "hidden_size", "num_layers",
                 "num_heads", "intermediate_size", "layer_norm_eps", "max_images_per_sequence"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.image_size % self.patch_size:
      raise ValueError(
          f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
      )
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
      )

  @property
  def tokens_per_image(self) -> int:
    return (self.image_size // self.patch_size) ** 2
