"""Step1ForCausalLM for transformers: remote code shipped beside an exported Step1's weights.

Pre-norm RMSNorm; grouped-query attention with contiguous groups (query head n reads kv group
n // (N / K)); no rope: position enters as the square-root ALiBi bias -slope[n] * sqrt(i - j)
between true positions; SwiGLU; untied lm_head; no biases. Imports only torch and transformers.

Axes: B batch, T new tokens, S key slots (cached, then new), N query heads, K kv groups,
R = N / K heads per group, H head dim, D model, V vocabulary.

sqrt is not linear, so ALiBi needs every key's true position at every step (an offset does not
cancel), and the cache holds keys and values only. Each call therefore derives positions from
the 2D attention_mask over all S slots (cumsum - 1, so left padding does not shift them), or
0..S-1 without one; position_ids, when given, are the new tokens' positions. A key is visible
to a query when its slot is not after the query's and is not padding. That is how `generate`
drives a DynamicCache, so cached decoding equals recomputing the whole sequence.
"""

import math

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_step1 import Step1Config


def alibi_slopes(num_heads: int) -> list[float]:
  """Slopes for the first 2**floor(log2 N) heads, then odd powers of 2**(-4/n) for the rest."""
  n = 2 ** math.floor(math.log2(num_heads))
  base = 2.0 ** (-4.0 / n)
  return ([2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]
          + [base ** (2 * m - 1) for m in range(1, num_heads - n + 1)])


def attention_bias(
    slopes_N: torch.Tensor, attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None, past: int, t: int,
) -> torch.Tensor:
  """[B, N, T, S] float32: the sqrt-ALiBi bias of visible pairs, float32's minimum elsewhere
  (finite, so a padding query's row softmaxes to something harmless instead of NaN). Built
  once per forward: every layer shares it."""
  device, s = slopes_N.device, past + t
  if attention_mask is None:
    slot_pos_BS = torch.arange(s, device=device)[None]
    real_BS = torch.ones_like(slot_pos_BS, dtype=torch.bool)
  else:
    if attention_mask.dim() != 2 or attention_mask.shape[-1] != s:
      raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; Step1 takes a "
                       f"2D [batch, {s}] mask over the {past} cached and {t} new tokens (and a "
                       "DynamicCache, generate's default: a static cache hands it a 4D mask)")
    real_BS = attention_mask.to(device=device, dtype=torch.bool)
    slot_pos_BS = attention_mask.to(device=device, dtype=torch.long).cumsum(-1) - 1
  q_pos_BT = slot_pos_BS[:, past:] if position_ids is None else position_ids.to(device)
  b = max(slot_pos_BS.shape[0], q_pos_BT.shape[0])
  q_pos_BT = q_pos_BT.expand(b, t)
  kv_pos_BS = torch.cat([slot_pos_BS[:, :past].expand(b, past), q_pos_BT], dim=1)
  dist_BTS = (q_pos_BT[:, :, None] - kv_pos_BS[:, None, :]).clamp(min=0).float()
  bias_BNTS = -slopes_N[None, :, None, None] * dist_BTS.sqrt()[:, None]
  causal_TS = (torch.arange(s, device=device)[None, :]
               <= past + torch.arange(t, device=device)[:, None])
  visible_BTS = causal_TS[None] & real_BS.expand(b, s)[:, None, :]
  return bias_BNTS.masked_fill(~visible_BTS[:, None], torch.finfo(torch.float32).min)


class Step1RMSNorm(nn.Module):
  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.eps = eps

  def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
    x32 = x_BTD.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return (y * self.weight.float()).to(x_BTD.dtype)


class Step1Attention(nn.Module):
  def __init__(self, config: Step1Config, layer_idx: int):
    super().__init__()
    d, self.heads, self.groups = (config.hidden_size, config.num_attention_heads,
                                  config.num_attention_groups)
    self.head_dim, self.layer_idx = config.head_dim, layer_idx
    self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=False)
    self.k_proj = nn.Linear(d, self.groups * self.head_dim, bias=False)
    self.v_proj = nn.Linear(d, self.groups * self.head_dim, bias=False)
    self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)

  def forward(self, x_BTD: torch.Tensor, bias_BNTS: torch.Tensor,
              cache: Cache | None) -> torch.Tensor:
    """Scores and softmax in float32 (the bias grows to slope * sqrt(32k)); GQA as one einsum
    per group, without repeating keys and values."""
    b, t, _ = x_BTD.shape
    n, k, h = self.heads, self.groups, self.head_dim
    q_BKRTH = self.q_proj(x_BTD).view(b, t, k, n // k, h).permute(0, 2, 3, 1, 4)
    k_BKSH = self.k_proj(x_BTD).view(b, t, k, h).transpose(1, 2)
    v_BKSH = self.v_proj(x_BTD).view(b, t, k, h).transpose(1, 2)
    if cache is not None:
      k_BKSH, v_BKSH = cache.update(k_BKSH, v_BKSH, self.layer_idx)
    s = k_BKSH.shape[2]
    scores = torch.einsum("bkrth,bksh->bkrts", q_BKRTH.float(), k_BKSH.float()) * h**-0.5
    scores = scores + bias_BNTS.view(b, k, n // k, t, s)
    probs = torch.softmax(scores, dim=-1).to(v_BKSH.dtype)
    ctx_BKRTH = torch.einsum("bkrts,bksh->bkrth", probs, v_BKSH)
    return self.o_proj(ctx_BKRTH.permute(0, 3, 1, 2, 4).reshape(b, t, n * h))


class Step1MLP(nn.Module):
  def __init__(self, config: Step1Config):
    super().__init__()
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = nn.Linear(d, f, bias=False)
    self.up_proj = nn.Linear(d, f, bias=False)
    self.down_proj = nn.Linear(f, d, bias=False)

  def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
    return self.down_proj(nn.functional.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class Step1DecoderLayer(nn.Module):
  def __init__(self, config: Step1Config, layer_idx: int):
    super().__init__()
    self.input_layernorm = Step1RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.self_attn = Step1Attention(config, layer_idx)
    self.post_attention_layernorm = Step1RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.mlp = Step1MLP(config)

  def forward(self, x_BTD: torch.Tensor, bias_BNTS: torch.Tensor,
              cache: Cache | None) -> torch.Tensor:
    x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), bias_BNTS, cache)
    return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))


class Step1PreTrainedModel(PreTrainedModel):
  config_class = Step1Config
  base_model_prefix = "model"
  _no_split_modules = ["Step1DecoderLayer"]


class Step1Model(Step1PreTrainedModel):
  def __init__(self, config: Step1Config):
    super().__init__(config)
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
    self.layers = nn.ModuleList(Step1DecoderLayer(config, i)
                                for i in range(config.num_hidden_layers))
    self.norm = Step1RMSNorm(config.hidden_size, config.rms_norm_eps)
    # A plain attribute, not a buffer: nothing to load, and meta-device init cannot lose it.
    self.slopes = alibi_slopes(config.num_attention_heads)
    self.post_init()

  def forward(
      self,
      input_ids: torch.LongTensor | None = None,
      attention_mask: torch.Tensor | None = None,
      position_ids: torch.LongTensor | None = None,
      cache: Cache | None = None,
      inputs_embeds: torch.Tensor | None = None,
      use_cache: bool | None = None,
  ) -> BaseModelOutputWithPast:
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    x_BTD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    use_cache = self.config.use_cache if use_cache is None else use_cache
    if use_cache and cache is None:
      cache = DynamicCache(config=self.config)
    past = cache.get_seq_length() if cache is not None else 0
    slopes_N = torch.tensor(self.slopes, dtype=torch.float32, device=x_BTD.device)
    bias_BNTS = attention_bias(slopes_N, attention_mask, position_ids, past, x_BTD.shape[1])
    for layer in self.layers:
      x_BTD = layer(x_BTD, bias_BNTS, cache)
    return BaseModelOutputWithPast(last_hidden_state=self.norm(x_BTD), cache=cache)


class Step1ForCausalLM(Step1PreTrainedModel, GenerationMixin):
  def __init__(self, config: Step1Config):
    super().__init__(config)
    self.model = Step1Model(config)
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()

  def forward(
      self,
      input_ids: torch.LongTensor | None = None,
      attention_mask: torch.Tensor | None = None,
      position_ids: torch.LongTensor | None = None,
      cache: Cache | None = None,
      inputs_embeds: torch.Tensor | None = None,
      labels: torch.LongTensor | None = None,
      use_cache: bool | None = None,
      logits_to_keep: int = 0,
      return_dict: bool | None = None,
  ) -> CausalLMOutputWithPast | tuple:
    """Logits [B, T, V] (the last logits_to_keep positions when > 0); with labels, the
    next-token cross-entropy transformers computes for every causal LM."""
    out = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache)
    h_BTD = out.last_hidden_state
    logits_BTV = self.lm_head(h_BTD[:, -logits_to_keep:] if logits_to_keep else h_BTD)
    loss = None
    if labels is not None:
      loss = self.loss_function(logits=logits_BTV, labels=labels,
                                vocab_size=self.config.vocab_size)
    result = CausalLMOutputWithPast(loss=loss, logits=logits_BTV, cache=out.cache)
    return result.to_tuple() if return_dict is False else result
