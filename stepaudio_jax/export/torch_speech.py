"""The flow model and the HiFi-GAN generator in PyTorch, loading exported JAX weights.

`state_dict(params)` turns a model's JAX parameter tree (state.params["flow"] or
state.params["generator"]) into a torch state dict, with the names and layouts of
export/speech_layout.py: the module tree of FlowTorch / GeneratorTorch below, so
`load_state_dict(strict=True)` checks every name and shape. `from_pretrained(dir)` builds either
from an export directory (`stepaudio export` of a flow or vocoder run), strictly. Torch modules
take and return the JAX tensors' layouts ([B, T, C]) so outputs compare directly.
"""

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from stepaudio_jax.config.speech import FlowConfig, VocoderConfig
from stepaudio_jax.export.speech_layout import public_tensors
from stepaudio_jax.export.torch_step1 import read_export


def state_dict(params: dict) -> dict[str, torch.Tensor]:
  """JAX parameter tree of one model -> torch state dict (export/speech_layout.py)."""
  return {name: torch.tensor(a.astype(np.float32)) for name, a in public_tensors(params).items()}


def sinusoid(x: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
  freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2) / (dim // 2))
  args = (scale * x)[..., None] * freqs
  return torch.cat([torch.sin(args), torch.cos(args)], -1)


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.qkv, self.out, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

  def forward(self, x, mask):
    b, t, d = x.shape
    q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    return self.out(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.down(F.silu(self.up(x)))


class ConformerBlock(nn.Module):
  def __init__(self, dim, heads, ffn, kernel):
    super().__init__()
    self.norm_ff1, self.ff1 = nn.LayerNorm(dim), FeedForward(dim, ffn)
    self.norm_attn, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
    self.norm_conv, self.pointwise1 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim)
    self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
    self.norm_depthwise, self.pointwise2 = nn.LayerNorm(dim), nn.Linear(dim, dim)
    self.norm_ff2, self.ff2 = nn.LayerNorm(dim), FeedForward(dim, ffn)
    self.norm_out = nn.LayerNorm(dim)

  def forward(self, x, mask):
    keep = mask[:, :, None].float()
    x = x + 0.5 * self.ff1(self.norm_ff1(x))
    x = x + self.attn(self.norm_attn(x), mask)
    y = F.glu(self.pointwise1(self.norm_conv(x)), -1) * keep
    y = F.silu(self.norm_depthwise(self.depthwise(y.transpose(1, 2)).transpose(1, 2)))
    x = x + self.pointwise2(y)
    x = x + 0.5 * self.ff2(self.norm_ff2(x))
    return self.norm_out(x) * keep


class DiTBlock(nn.Module):
  def __init__(self, dim, heads, ffn):
    super().__init__()
    self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
    self.norm2, self.mlp = nn.LayerNorm(dim), FeedForward(dim, ffn)
    self.modulation = nn.Linear(dim, 6 * dim)

  def forward(self, x, mask, temb):
    s1, c1, g1, s2, c2, g2 = self.modulation(F.silu(temb))[:, None].chunk(6, -1)
    x = x + g1 * self.attn(self.norm1(x) * (1 + c1) + s1, mask)
    return x + g2 * self.mlp(self.norm2(x) * (1 + c2) + s2)


def regulate(h, n, f, frames):
  j = torch.arange(frames, dtype=torch.float32)[None]
  nf, ff = n.float()[:, None], f.clamp(min=1).float()[:, None]
  src = torch.minimum(((j + 0.5) * nf / ff - 0.5).clamp(min=0), (nf - 1).clamp(min=0))
  lo = src.floor().long()
  hi = torch.minimum(lo + 1, (n[:, None] - 1).clamp(min=0))
  w = (src - lo)[..., None]
  take = lambda i: torch.gather(h, 1, i[..., None].expand(-1, -1, h.shape[-1]))
  return (take(lo) * (1 - w) + take(hi) * w) * (j < f[:, None]).float()[..., None]


class FlowTorch(nn.Module):
  """models/flow.py FlowModel: encode(codes, n, f, frames) and velocity(x, mask, mu, t, spk,
  cond), same arguments and layouts."""

  def __init__(self, cfg: FlowConfig, n_mels: int, speaker_dim: int):
    super().__init__()
    self.code_embed = nn.Parameter(torch.zeros(cfg.vocab, cfg.embed_dim))
    self.encoder = nn.ModuleList([ConformerBlock(cfg.embed_dim, cfg.encoder_heads,
                                                 cfg.encoder_ffn, cfg.encoder_kernel)
                                  for _ in range(cfg.encoder_layers)])
    self.encoder_proj = nn.Linear(cfg.embed_dim, n_mels)
    self.speaker_proj = nn.Linear(speaker_dim, n_mels)
    self.input_proj = nn.Linear(4 * n_mels, cfg.dim)
    self.time_mlp1, self.time_mlp2 = nn.Linear(cfg.dim, cfg.dim), nn.Linear(cfg.dim, cfg.dim)
    self.blocks = nn.ModuleList([DiTBlock(cfg.dim, cfg.heads, cfg.ffn) for _ in range(cfg.depth)])
    self.norm_out = nn.LayerNorm(cfg.dim)
    self.out_modulation = nn.Linear(cfg.dim, 2 * cfg.dim)
    self.out_proj = nn.Linear(cfg.dim, n_mels)

  @classmethod
  def from_pretrained(cls, directory: str) -> "FlowTorch":
    cfg, tensors = read_export(directory, "StepAudioFlow")
    module = cls(FlowConfig(**cfg["flow"]), cfg["mel"]["n_mels"], cfg["speaker_dim"])
    module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return module.eval()

  def encode(self, codes, n, f, frames):
    mask = torch.arange(codes.shape[1])[None] < n[:, None]
    x = self.code_embed[codes]
    x = x + sinusoid(torch.arange(codes.shape[1]).float(), x.shape[-1], 1.0)[None]
    for block in self.encoder:
      x = block(x, mask)
    return self.encoder_proj(regulate(x, n, f, frames))

  def speaker(self, spk):
    return self.speaker_proj(F.normalize(spk, dim=-1, eps=1e-6))

  def velocity(self, x, mask, mu, t, spk, cond):
    h = self.input_proj(torch.cat([x, mu, spk[:, None].expand_as(x), cond], -1))
    h = h + sinusoid(torch.arange(x.shape[1]).float(), h.shape[-1], 1.0)[None]
    temb = self.time_mlp2(F.silu(self.time_mlp1(sinusoid(t, h.shape[-1]))))
    for block in self.blocks:
      h = block(h, mask, temb)
    shift, scale = self.out_modulation(F.silu(temb))[:, None].chunk(2, -1)
    return self.out_proj(self.norm_out(h) * (1 + scale) + shift) * mask[..., None].float()


class ResBlock(nn.Module):
  def __init__(self, ch, kernel, dilations):
    super().__init__()
    self.convs1 = nn.ModuleList([nn.Conv1d(ch, ch, kernel, dilation=d, padding=(kernel - 1) * d // 2)
                                 for d in dilations])
    self.convs2 = nn.ModuleList([nn.Conv1d(ch, ch, kernel, padding=kernel // 2)
                                 for _ in dilations])

  def forward(self, x):
    for c1, c2 in zip(self.convs1, self.convs2):
      x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1))
    return x


class GeneratorTorch(nn.Module):
  """models/hifigan.py Generator: log-mel [B, F, M] -> wave [B, F * hop]."""

  def __init__(self, cfg: VocoderConfig, n_mels: int):
    super().__init__()
    self.conv_pre = nn.Conv1d(n_mels, cfg.channels, 7, padding=3)
    self.ups, self.resblocks = nn.ModuleList(), nn.ModuleList()
    ch = cfg.channels
    for r, k in zip(cfg.upsample_rates, cfg.upsample_kernels):
      self.ups.append(nn.ConvTranspose1d(ch, ch // 2, k, r, padding=(k - r) // 2))
      ch //= 2
      self.resblocks.extend(ResBlock(ch, rk, cfg.resblock_dilations)
                            for rk in cfg.resblock_kernels)
    self.conv_post = nn.Conv1d(ch, 1, 7, padding=3)
    self.kernels = len(cfg.resblock_kernels)

  @classmethod
  def from_pretrained(cls, directory: str) -> "GeneratorTorch":
    cfg, tensors = read_export(directory, "StepAudioHiFiGAN")
    module = cls(VocoderConfig(**cfg["vocoder"]), cfg["mel"]["n_mels"])
    module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return module.eval()

  def forward(self, mel):
    x = self.conv_pre(mel.transpose(1, 2))
    for i, up in enumerate(self.ups):
      x = up(F.leaky_relu(x, 0.1))
      blocks = self.resblocks[i * self.kernels:(i + 1) * self.kernels]
      x = sum(b(x) for b in blocks) / self.kernels
    return torch.tanh(self.conv_post(F.leaky_relu(x, 0.01)))[:, 0]
