"""Run a stack of identical layers with a scan (or a Python loop) under a named remat policy.

Layer activations worth keeping are tagged with `checkpoint_name` inside the layer; a policy
names which tags survive the forward pass. The scan carries one layer's graph and slices the
stacked parameters, so compile time does not grow with depth.
"""

import enum
from collections.abc import Callable

import jax
from flax import nnx


class Remat(str, enum.Enum):
  NONE = "none"  # keep every activation
  FULL = "full"  # keep only layer inputs
  SAVE_DOTS = "save_dots"  # keep matmul outputs without batch dims
  SAVE_QKV = "save_qkv"  # keep the q, k, v projections
  SAVE_ATTENTION = "save_attention"  # keep the attention context (skips re-running attention)


def remat_policy(remat: Remat) -> Callable | None:
  cp = jax.checkpoint_policies
  return {
      Remat.FULL: cp.nothing_saveable,
      Remat.SAVE_DOTS: cp.dots_with_no_batch_dims_saveable,
      Remat.SAVE_QKV: cp.save_only_these_names("query", "key", "value"),
      Remat.SAVE_ATTENTION: cp.save_only_these_names("attention_context"),
  }.get(Remat(remat))


def run_layers(
    layers: nnx.Module, x: jax.Array, *args, num_layers: int, remat: Remat, scan: bool
) -> jax.Array:
  """Apply `layers` (parameters stacked on axis 0) to x in order; args go to every layer."""
  graphdef, state = nnx.split(layers)

  def body(h, layer_state):
    return nnx.merge(graphdef, layer_state)(h, *args), None

  if Remat(remat) is not Remat.NONE:
    body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=not scan)
  if scan:
    x, _ = jax.lax.scan(body, x, state)
    return x
  for i in range(num_layers):
    x, _ = body(x, jax.tree.map(lambda a, i=i: a[i], state))
  return x
