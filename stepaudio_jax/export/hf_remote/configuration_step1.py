"""Step1Config: an exported Step1 LM's config.json as transformers reads it (remote code).

Shipped beside the weights, so it imports only transformers.
"""

from transformers import PreTrainedConfig


class Step1Config(PreTrainedConfig):
  """The fields of Step-Audio's config.json; defaults are Step-Audio-Chat (130B).

  num_attention_groups is the number of key/value heads (query head n reads group
  n // (heads / groups)); there is no rope, so no rope fields. head_dim defaults to
  hidden_size // num_attention_heads because the public configs leave it out.
  """

  model_type = "step1"
  # Names generic transformers code (static caches, pipelines) asks for.
  attribute_map = {"num_key_value_heads": "num_attention_groups",
                   "max_position_embeddings": "max_seq_len"}

  vocab_size: int = 74752
  hidden_size: int = 12288
  num_hidden_layers: int = 88
  num_attention_heads: int = 96
  num_attention_groups: int = 8
  head_dim: int | None = None
  intermediate_size: int = 31232
  max_seq_len: int = 32768
  rms_norm_eps: float = 1e-5
  hidden_act: str = "silu"
  initializer_range: float = 0.02
  use_cache: bool = True
  bos_token_id: int | None = 1
  eos_token_id: int | list[int] | None = 3
  pad_token_id: int | None = 0
  tie_word_embeddings: bool = False

  def __post_init__(self, **kwargs):
    if self.head_dim is None:
      self.head_dim = self.hidden_size // self.num_attention_heads
    if self.num_attention_heads % self.num_attention_groups:
      raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                       f"num_attention_groups={self.num_attention_groups}")
    if self.hidden_act != "silu":
      raise ValueError(f"hidden_act={self.hidden_act!r}: Step1's MLP is SwiGLU (silu)")
    super().__post_init__(**kwargs)
