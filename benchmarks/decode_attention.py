"""Decode attention against the memory-bandwidth bound: the Pallas decode kernel and the XLA path.

  python benchmarks/decode_attention.py                  # accelerator: cache 4k..32k; CPU: reduced
  python benchmarks/decode_attention.py --slots 8192 --batch 32 --new 4 --iters 20

A decode step reads the whole filled KV cache once and does little arithmetic with it, so its
floor is bytes / HBM bandwidth. Per shape (head_dim 128, sqrt-ALiBi, one new token per row by
default, the cache full: kv_length = S) and per implementation:

  pallas      stepaudio_jax.kernels.attention(implementation="pallas"): the decode kernel
              (accelerator only; interpret mode on CPU measures nothing useful)
  reference   stepaudio_jax.kernels.attention(implementation="xla"): einsum over the cache

  bound us    (K and V cache + queries + output + slot ids and positions) / HBM bandwidth of the
              device (a table of vendor numbers; --hbm-gbps overrides, e.g. on CPU)
  us          median time of --iters runs after one warm-up
  of bound    bound / time: the fraction of the bandwidth the step achieves

The table is for people; the last line printed is one JSON object with every number.
"""

import argparse
import functools
import json
import statistics
import time

from stepaudio_jax.launch import prefer_cpu_without_accelerators

prefer_cpu_without_accelerators()  # before jax: no TPU-runtime errors on a CPU-only host

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from stepaudio_jax import kernels  # noqa: E402

HBM_GBPS = {"TPU v4": 1228, "TPU v5 lite": 819, "TPU v5e": 819, "TPU v5p": 2765,
            "TPU v6 lite": 1640, "TPU v6e": 1640, "NVIDIA H100": 3350, "NVIDIA H200": 4800,
            "NVIDIA A100": 2039}  # per device, vendor figures
GQA = {"gqa12": (12, 1), "gqa8": (16, 2)}  # Step-Audio-Chat per chip at tensor=8, and 8:1


def hbm_gbps(override: float) -> float:
  if override:
    return override
  kind = jax.devices()[0].device_kind
  return next((bw for name, bw in HBM_GBPS.items() if kind.startswith(name)), 0.0)


def _inputs(batch, new, n, kv, slots, dtype):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, new, n, 128), dtype)
  k = jax.random.normal(keys[1], (batch, slots, kv, 128), dtype)
  v = jax.random.normal(keys[2], (batch, slots, kv, 128), dtype)
  pos = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (batch, slots))
  seg = jnp.ones((batch, slots), jnp.int32)
  sides = (seg[:, -new:], pos[:, -new:], seg, pos)
  return (q, k, v, *sides), sum(x.size * x.dtype.itemsize for x in (q, q, k, v, *sides))


def _attend(impl, q, k, v, q_seg, q_pos, kv_seg, kv_pos):
  return kernels.attention(q, k, v, q_segment_ids=q_seg, q_positions=q_pos,
                           kv_segment_ids=kv_seg, kv_positions=kv_pos,
                           kv_length=jnp.int32(k.shape[1]), implementation=impl)


def _time(fn, args, iters: int) -> float:
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run(slots_list, batch, new, iters, dtype, gbps) -> list[dict]:
  impls = ["reference"] + (["pallas"] if jax.default_backend() in ("tpu", "gpu") else [])
  rows = []
  for gqa, (n, kv) in GQA.items():
    for slots in slots_list:
      args, nbytes = _inputs(batch, new, n, kv, slots, dtype)
      bound = nbytes / (gbps * 1e9) if gbps else float("nan")
      for impl in impls:
        fn = functools.partial(_attend, "xla" if impl == "reference" else "pallas")
        row = {"impl": impl, "gqa": gqa, "heads": n, "kv_heads": kv, "slots": slots,
               "batch": batch, "new": new, "bytes": nbytes, "bound_us": bound * 1e6}
        try:
          seconds = _time(fn, args, iters)
          row |= {"us": seconds * 1e6, "of_bound": bound / seconds}
        except Exception as e:  # noqa: BLE001  (an OOM is a result, not a crash)
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--slots", default=None, help="comma-separated cache lengths S")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--new", type=int, default=1, help="new query positions per row (T)")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--hbm-gbps", type=float, default=0.0,
                      help="memory bandwidth for the bound (default: the device table)")
  a = parser.parse_args()
  backend = jax.default_backend()
  on_accelerator = backend in ("tpu", "gpu")
  default = "4096,8192,16384,32768" if on_accelerator else "1024,4096"
  slots_list = [int(s) for s in (a.slots or default).split(",")]
  if not on_accelerator:
    print(f"backend {backend}: the Pallas decode kernel needs an accelerator (TPU or GPU); "
          f"timing only the reference path at reduced sizes {slots_list}")
  gbps = hbm_gbps(a.hbm_gbps)
  rows = run(slots_list, a.batch, a.new, a.iters, jnp.dtype(a.dtype), gbps)
  print(f"device: {jax.devices()[0].device_kind}  HBM {gbps or '?'} GB/s  dtype {a.dtype}  "
        f"head_dim 128  batch {a.batch}  new tokens {a.new}")
  print(f"{'impl':<10} {'gqa':<6} {'slots':>6} | {'MiB':>8} {'bound us':>9} {'us':>9} "
        f"{'of bound':>8}")
  for r in rows:
    timing = (f"{'error':>18}" if "error" in r
              else f"{r['us']:9.1f} {100 * r['of_bound']:7.1f}%")
    print(f"{r['impl']:<10} {r['gqa']:<6} {r['slots']:>6} | {r['bytes'] / 2**20:8.1f} "
          f"{r['bound_us']:9.1f} {timing}")
  for r in rows:
    if "error" in r:
      print(f"{r['impl']} {r['gqa']} S={r['slots']}: {r['error']}")
  print(json.dumps({"backend": backend, "device": jax.devices()[0].device_kind,
                    "hbm_gbps": gbps, "dtype": a.dtype, "pallas_timed": on_accelerator,
                    "rows": rows}))


if __name__ == "__main__":
  main()
