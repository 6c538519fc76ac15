"""The one entry point for attention; implementations plug in behind it."""

import chex
from jaxtyping import Array, Float, Int

from stepaudio_jax.kernels.reference import xla_attention

BIASES = ("alibi_sqrt", "none")
IMPLEMENTATIONS = ("xla",)


def attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    *,
    segment_ids: Int[Array, "B T"] | None = None,
    positions: Int[Array, "B T"] | None = None,
    bias: str = "alibi_sqrt",
    causal: bool = True,
    implementation: str = "xla",
) -> Float[Array, "B T N H"]:
  """Causal GQA attention with Step1's square-root ALiBi bias (or none, for RoPE models).

  positions are in-segment positions (they drive the bias); segment_ids keep packed sequences
  apart. Query head h reads kv head h // (N // K).
  """
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([k, v])
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
  if bias not in BIASES:
    raise ValueError(f"unknown attention bias {bias!r}; expected one of {BIASES}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"attention implementation {implementation!r} is not available; "
        f"choose one of {IMPLEMENTATIONS}"
    )
  return xla_attention(
      q, k, v, segment_ids=segment_ids, positions=positions, bias=bias, causal=causal
  )
