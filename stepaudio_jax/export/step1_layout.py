"""Our Step1 parameters <-> the public Hugging Face layouts (Step1ForCausalLM, LlamaForCausalLM).

One table says, per public tensor, which of our arrays (and which layer of a stacked one) it
comes from and how its axes move: our einsum layouts ([D, N, H] for wq, [D, F] for w_gate, ...)
become PyTorch Linear weights [out_features, in_features] with heads flattened head-major
(query head n occupies rows n*H..(n+1)*H-1; kv group k likewise, so GQA groups stay
contiguous). The same table drives export, import and the config files, so the two directions
cannot drift apart.
"""

import dataclasses
from collections.abc import Callable

import numpy as np

from stepaudio_jax.config.model import PositionEncoding, Step1Config, TokenLayout

STEP1_ARCH, LLAMA_ARCH = "Step1ForCausalLM", "LlamaForCausalLM"
REWARD_ARCH = "Step1ForRewardModel"  # the Step1 backbone with a scalar `score` head (bias too)


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One public tensor: name, our array (path inside the model) and layer, both transforms."""

  name: str
  ours: tuple[str, ...]
  layer: int | None
  public_shape: tuple[int, ...]
  our_shape: tuple[int, ...]  # of one layer for stacked arrays
  to_public: Callable[[np.ndarray], np.ndarray]  # also maps a block along row_axis to rows
  to_ours: Callable[[np.ndarray], np.ndarray]
  row_axis: int = 0  # the axis of our (one-layer) array that becomes the public leading axis

  @property
  def index(self) -> tuple:
    return () if self.layer is None else (self.layer,)


def _same(x: np.ndarray) -> np.ndarray:
  return x


def _t(x: np.ndarray) -> np.ndarray:
  return x.T


def tensor_maps(cfg: Step1Config, lm_head: bool = True, prefix: tuple[str, ...] = ()
                ) -> list[TensorMap]:
  """Every public tensor of the LM, in checkpoint order (embedding, layers, norm, head);
  `prefix` is where the Step1 tree sits inside the model (a reward model's `lm`)."""
  d, n, k, h, f, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                      cfg.intermediate_size, cfg.vocab_size)

  def heads_in(count):  # wq/wk/wv [D, count, H] <-> [count*H, D]; rows come from the head axis
    return (lambda x: x.reshape(d, -1).T,
            lambda x: x.T.reshape(d, count, h), 1)

  maps = [TensorMap("model.embed_tokens.weight", ("embed",), None, (v, d), (v, d), _same, _same)]
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    layer = [
        ("self_attn.q_proj.weight", ("wq",), (n * h, d), (d, n, h), *heads_in(n)),
        ("self_attn.k_proj.weight", ("wk",), (k * h, d), (d, k, h), *heads_in(k)),
        ("self_attn.v_proj.weight", ("wv",), (k * h, d), (d, k, h), *heads_in(k)),
        ("self_attn.o_proj.weight", ("wo",), (d, n * h), (n, h, d),
         lambda x: x.reshape(n * h, -1).T, lambda x: x.T.reshape(n, h, d), 2),
        ("mlp.gate_proj.weight", ("w_gate",), (f, d), (d, f), _t, _t, 1),
        ("mlp.up_proj.weight", ("w_up",), (f, d), (d, f), _t, _t, 1),
        ("mlp.down_proj.weight", ("w_down",), (d, f), (f, d), _t, _t, 1),
        ("input_layernorm.weight", ("input_norm", "scale"), (d,), (d,), _same, _same, 0),
        ("post_attention_layernorm.weight", ("post_attention_norm", "scale"), (d,), (d,), _same,
         _same, 0),
    ]
    maps += [TensorMap(p + name, ("layers",) + ours, i, pub, our, fwd, back, axis)
             for name, ours, pub, our, fwd, back, axis in layer]
  maps.append(TensorMap("model.norm.weight", ("final_norm", "scale"), None, (d,), (d,), _same,
                        _same))
  if lm_head:
    maps.append(TensorMap("lm_head.weight", ("lm_head",), None, (v, d), (d, v), _t, _t, 1))
  return [dataclasses.replace(m, ours=prefix + m.ours) for m in maps] if prefix else maps


def reward_tensor_maps(cfg: Step1Config) -> list[TensorMap]:
  """A reward model (or critic): the Step1 backbone without its LM head, then the scalar head
  as `score` [1, D] and its bias [1]."""
  d = cfg.hidden_size
  return tensor_maps(cfg, lm_head=False, prefix=("lm",)) + [
      TensorMap("score.weight", ("head", "weight"), None, (1, d), (d, 1), _t, _t, 1),
      TensorMap("score.bias", ("head", "bias"), None, (1,), (1,), _same, _same, 0),
  ]


def stacked_shape(cfg: Step1Config, m: TensorMap) -> tuple[int, ...]:
  """The shape of our stored array for m (layers stacked on a leading axis)."""
  return m.our_shape if m.layer is None else (cfg.num_layers,) + m.our_shape


def architecture(cfg: Step1Config, kind: str = "step1") -> str:
  if kind == "reward":
    return REWARD_ARCH
  return LLAMA_ARCH if cfg.position_encoding == PositionEncoding.ROPE else STEP1_ARCH


def hf_config(cfg: Step1Config, tokens: TokenLayout, torch_dtype: str, kind: str = "step1"
              ) -> dict:
  """config.json: the public Step1 fields, or a plain Llama config for the rope variant; a
  reward model says so (its architecture, its head) and how it encodes positions."""
  common = {
      "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "head_dim": cfg.head_dim,
      "intermediate_size": cfg.intermediate_size,
      "vocab_size": cfg.vocab_size,
      "rms_norm_eps": cfg.rms_norm_eps,
      "bos_token_id": tokens.bos_id,
      "eos_token_id": tokens.eos_id,
      "pad_token_id": tokens.pad_id,
      "hidden_act": "silu",
      "tie_word_embeddings": False,
      "torch_dtype": torch_dtype,
  }
  if kind == "reward":
    return {"architectures": [REWARD_ARCH], "model_type": "step1_reward", **common,
            "num_attention_groups": cfg.num_kv_heads, "max_seq_len": cfg.max_seq_len,
            "position_encoding": cfg.position_encoding.value, "rope_theta": cfg.rope_theta,
            "score_head": {"outputs": 1, "bias": True, "read_at": "last token (the <|EOT|>)"}}
  if architecture(cfg) == STEP1_ARCH:
    return {"architectures": [STEP1_ARCH], "model_type": "step1", **common,
            "num_attention_groups": cfg.num_kv_heads, "max_seq_len": cfg.max_seq_len,
            # the remote code export/hf_remote ships beside the weights
            "auto_map": {"AutoConfig": "configuration_step1.Step1Config",
                         "AutoModelForCausalLM": "modeling_step1.Step1ForCausalLM"}}
  return {"architectures": [LLAMA_ARCH], "model_type": "llama", **common,
          "num_key_value_heads": cfg.num_kv_heads,
          "max_position_embeddings": cfg.max_seq_len,
          "rope_theta": cfg.rope_theta,
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
          "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
          "initializer_range": cfg.init_std}


def generation_config(tokens: TokenLayout) -> dict:
  return {"bos_token_id": tokens.bos_id, "eos_token_id": tokens.eos_id,
          "pad_token_id": tokens.pad_id}


def tokenizer_config(cfg: Step1Config, tokens: TokenLayout, has_model: bool) -> dict:
  """Special ids and where each kind of token lives; names the sentencepiece model if shipped."""
  out = {
      "model_max_length": cfg.max_seq_len,
      "bos_token_id": tokens.bos_id,
      "eos_token_id": tokens.eos_id,
      "pad_token_id": tokens.pad_id,
      "bot_token_id": tokens.bot_id,
      "token_layout": {
          "text": [0, tokens.text_vocab_size],
          "audio_linguistic": [tokens.linguistic_offset, tokens.semantic_offset],
          "audio_semantic": [tokens.semantic_offset, tokens.image_placeholder_id],
          "image_placeholder": tokens.image_placeholder_id,
          "vocab_size": cfg.vocab_size,
      },
  }
  if has_model:
    out.update(tokenizer_class="LlamaTokenizer", vocab_file="tokenizer.model")
  return out


def model_overrides(hf: dict, source: str) -> dict[str, object]:
  """Step1Config fields (as `model.*` / `tokens.*` keys) read from a public config.json.

  `source` is the file's path, for error messages.
  """
  arch = (hf.get("architectures") or [None])[0]
  if arch not in (STEP1_ARCH, LLAMA_ARCH):
    raise ValueError(
        f"{source}: architecture {arch!r} (model_type {hf.get('model_type')!r}) is not "
        f"importable; expected {STEP1_ARCH} (Step-Audio) or {LLAMA_ARCH}"
    )
  try:
    heads = hf["num_attention_heads"]
    out: dict[str, object] = {
        "model.vocab_size": hf["vocab_size"],
        "model.hidden_size": hf["hidden_size"],
        "model.num_layers": hf["num_hidden_layers"],
        "model.num_heads": heads,
        "model.head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "model.intermediate_size": hf["intermediate_size"],
        "model.rms_norm_eps": hf.get("rms_norm_eps", 1e-5),
    }
    if arch == STEP1_ARCH:
      out["model.num_kv_heads"] = hf["num_attention_groups"]
      out["model.max_seq_len"] = hf.get("max_seq_len", 32768)
      out["model.position_encoding"] = PositionEncoding.ALIBI_SQRT.value
    else:
      out["model.num_kv_heads"] = hf.get("num_key_value_heads") or heads
      out["model.max_seq_len"] = hf.get("max_position_embeddings", 4096)
      out["model.position_encoding"] = PositionEncoding.ROPE.value
      rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
      if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{source}: rope scaling {rope} is not supported (plain RoPE only)")
      out["model.rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
      for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
          raise ValueError(f"{source}: {flag}=true is not supported (Step1 has no biases)")
  except KeyError as e:
    raise ValueError(f"{source}: missing field {e.args[0]!r} of a {arch} config") from e
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; Step1 uses silu (SwiGLU)")
  for ours, theirs in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"),
                       ("pad_id", "pad_token_id")):
    value = hf.get(theirs)
    if isinstance(value, list):
      value = value[0]
    if value is not None:
      out[f"tokens.{ours}"] = value
  return out
