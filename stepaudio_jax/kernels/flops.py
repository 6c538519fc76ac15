"""Attention work counts: the kernels' cost estimates for XLA and the benchmark's TFLOP/s."""

# matmuls per (query, key, head_dim) triple: forward q.k and p.v; backward recomputes q.k and
# adds do.v, ds.k (dq kernel) and q.k, do.v, p.do, ds.q (dk/dv kernel)
FWD_MATMULS = 2
BWD_MATMULS = 7


def attention_flops(b: int, t: int, n: int, h: int, causal: bool, matmuls: int) -> float:
  """2*T*T*H flops per matmul per head, halved when causal skips the upper triangle."""
  return 2.0 * matmuls * b * n * t * t * h * (0.5 if causal else 1.0)


def attention_exps(b: int, t: int, n: int, causal: bool) -> float:
  return b * n * t * t * (0.5 if causal else 1.0)
