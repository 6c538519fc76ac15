"""Run a stack of identical layers with a scan (or a Python loop) under a named remat policy.

Layer activations worth keeping are tagged with `checkpoint_name` inside the layer; a policy
names which tags survive the forward pass. The scan carries one layer's graph and slices the
stacked parameters, so compile time does not grow with depth. A KV cache is sliced the same
way: each layer's keys and values go in with its parameters and come out as the scan's ys.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from stepaudio_jax.config.model import Remat
from stepaudio_jax.models.kv_cache import KVCache


def remat_policy(remat: Remat) -> Callable | None:
  cp = jax.checkpoint_policies
  return {
      Remat.FULL: cp.nothing_saveable,
      Remat.SAVE_DOTS: cp.dots_with_no_batch_dims_saveable,
      Remat.SAVE_QKV: cp.save_only_these_names("query", "key", "value"),
      Remat.SAVE_ATTENTION: cp.save_only_these_names("attention_context"),
      Remat.SAVE_MLP: cp.save_only_these_names("mlp_gate", "mlp_up", "attention_residual"),
  }.get(Remat(remat))


def run_layers(
    layers: nnx.Module, x: jax.Array, *args, num_layers: int, remat: Remat, scan: bool,
    cache: KVCache | None = None,
) -> jax.Array | tuple[jax.Array, KVCache]:
  """Apply `layers` (parameters stacked on axis 0) to x in order; args go to every layer.

  With a cache, layer i is called with cache=(the cache holding layer i's keys and values) and
  returns (x, that cache updated); the result is (x, the cache with every layer's update).
  """
  graphdef, state = nnx.split(layers)

  def body(h, xs):
    layer_state, kv = xs
    layer = nnx.merge(graphdef, layer_state)
    if cache is None:
      return layer(h, *args), None
    h, layer_cache = layer(h, *args, cache=cache.replace(keys=kv[0], values=kv[1]))
    return h, (layer_cache.keys, layer_cache.values)

  if Remat(remat) is not Remat.NONE:
    body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=not scan)
  xs = (state, None if cache is None else (cache.keys, cache.values))
  if scan:
    x, kv = jax.lax.scan(body, x, xs)
  else:
    outs = []
    for i in range(num_layers):
      x, kv_i = body(x, jax.tree.map(lambda a, i=i: a[i], xs))
      outs.append(kv_i)
    kv = jax.tree.map(lambda *a: jnp.stack(a), *outs)
  if cache is None:
    return x
  return x, cache.replace(keys=kv[0], values=kv[1])
