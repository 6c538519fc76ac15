"""A small, readable PyTorch Step1ForCausalLM that loads an exported directory.

For checking exports without trust_remote_code: the architecture of facts.md section 1 in plain
torch. Pre-norm RMSNorm; GQA with contiguous groups (query head h reads kv group
h // (heads / groups)); no RoPE, position enters as the square-root ALiBi bias
-slope[h] * sqrt(i - j); SwiGLU; untied lm_head; no biases. Weights come from safetensors
(`safetensors.torch.load_file`), never from pickle.
"""

import json
import math
import os

import torch
from safetensors.torch import load_file
from torch import nn

INDEX_NAME = "model.safetensors.index.json"


def alibi_slopes(num_heads: int) -> torch.Tensor:
  """Slopes for the first 2**floor(log2 H) heads, then odd powers of 2**(-4/n) for the rest."""
  n = 2 ** math.floor(math.log2(num_heads))
  slopes = [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]
  slopes += [(2.0 ** (-4.0 / n)) ** (2 * m - 1) for m in range(1, num_heads - n + 1)]
  return torch.tensor(slopes, dtype=torch.float32)


class RMSNorm(nn.Module):
  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.eps = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return (y * self.weight.float()).to(x.dtype)


class Attention(nn.Module):
  def __init__(self, cfg: dict):
    super().__init__()
    d, self.heads, self.groups = cfg["hidden_size"], cfg["num_attention_heads"], cfg[
        "num_attention_groups"]
    self.head_dim = cfg.get("head_dim") or d // self.heads
    self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=False)
    self.k_proj = nn.Linear(d, self.groups * self.head_dim, bias=False)
    self.v_proj = nn.Linear(d, self.groups * self.head_dim, bias=False)
    self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)
    self.register_buffer("slopes", alibi_slopes(self.heads), persistent=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, t, _ = x.shape
    q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(b, t, self.groups, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(b, t, self.groups, self.head_dim).transpose(1, 2)
    rep = self.heads // self.groups
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # contiguous groups
    logits = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim**-0.5
    pos = torch.arange(t, device=x.device)
    dist = (pos[:, None] - pos[None, :]).float()
    bias = -self.slopes[:, None, None] * dist.clamp(min=0).sqrt()[None]
    logits = (logits + bias).masked_fill(dist < 0, float("-inf"))
    ctx = torch.softmax(logits, dim=-1).to(v.dtype) @ v
    return self.o_proj(ctx.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
  def __init__(self, cfg: dict):
    super().__init__()
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    self.gate_proj = nn.Linear(d, f, bias=False)
    self.up_proj = nn.Linear(d, f, bias=False)
    self.down_proj = nn.Linear(f, d, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
  def __init__(self, cfg: dict):
    super().__init__()
    self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
    self.self_attn = Attention(cfg)
    self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
    self.mlp = MLP(cfg)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.self_attn(self.input_layernorm(x))
    return x + self.mlp(self.post_attention_layernorm(x))


class Step1Model(nn.Module):
  def __init__(self, cfg: dict):
    super().__init__()
    self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
    self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))
    self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])

  def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    x = self.embed_tokens(input_ids)
    for layer in self.layers:
      x = layer(x)
    return self.norm(x)


class Step1ForCausalLM(nn.Module):
  def __init__(self, cfg: dict):
    super().__init__()
    self.config = cfg
    self.model = Step1Model(cfg)
    self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

  def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] in float32."""
    return self.lm_head(self.model(input_ids)).float()

  @classmethod
  def from_pretrained(cls, directory: str, dtype: torch.dtype = torch.float32):
    """Build from config.json and load every tensor of the safetensors files, strictly."""
    cfg, state = read_export(directory, "Step1ForCausalLM")
    model = cls(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


class Step1ForRewardModel(nn.Module):
  """A reward model (or critic) export: the Step1 backbone and a scalar `score` head with a
  bias; one float32 score per position (a reward model's is read at the closing <|EOT|>)."""

  def __init__(self, cfg: dict):
    super().__init__()
    self.config = cfg
    self.model = Step1Model(cfg)
    self.score = nn.Linear(cfg["hidden_size"], 1, bias=True)

  def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    """Scores [B, T] in float32."""
    return self.score(self.model(input_ids).float())[..., 0]

  @classmethod
  def from_pretrained(cls, directory: str, dtype: torch.dtype = torch.float32):
    cfg, state = read_export(directory, "Step1ForRewardModel")
    if cfg.get("position_encoding", "alibi_sqrt") != "alibi_sqrt":
      raise ValueError(f"{directory}: position_encoding={cfg['position_encoding']!r}; this module "
                       "implements the square-root ALiBi of Step1")
    model = cls(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def read_export(directory: str, architecture: str) -> tuple[dict, dict[str, torch.Tensor]]:
  """(config.json, every tensor of the safetensors files) of an export of `architecture`."""
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} does not exist; export the model first")
  with open(config_path) as f:
    cfg = json.load(f)
  if cfg.get("architectures") != [architecture]:
    raise ValueError(
        f"{config_path}: architectures={cfg.get('architectures')}, not {architecture} (a rope LM "
        "export is a LlamaForCausalLM: load it with transformers)"
    )
  index = os.path.join(directory, INDEX_NAME)
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = ["model.safetensors"]
  state = {}
  for name in files:
    state.update(load_file(os.path.join(directory, name)))
  return cfg, state
