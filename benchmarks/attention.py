"""Attention throughput and memory: the Pallas flash kernel against the library and reference paths.

  python benchmarks/attention.py                     # accelerator: T = 2k..16k; CPU: reduced
  python benchmarks/attention.py --seqs 2048,4096 --batch 2 --iters 10

Per shape (head_dim 128, causal, sqrt-ALiBi, GQA 12:1 = Step-Audio-Chat's heads per chip at
tensor=8, and 8:1) and per implementation:

  pallas      stepaudio_jax.kernels.attention(implementation="pallas"): the flash kernel
              (accelerator only; interpret mode on CPU measures nothing useful)
  reference   stepaudio_jax.kernels.attention(implementation="xla"): einsum, bias materialised
  jax_xla     jax.nn.dot_product_attention(implementation="xla"), [B, N, T, T] bias materialised
  jax_cudnn   the same on cuDNN (GPU only)

  TFLOP/s     analytic causal work over the median time of --iters runs after one warm-up:
              forward 2 matmuls (q.k, p.v), forward+backward 2 + 5 (FlashAttention-2's count,
              one recompute of q.k) of 2*B*N*T*T*H/2 FLOPs each
  peak MiB    compiled memory_analysis(): argument + output + temp bytes of the program
  OOM/error   a path that does not compile or run at a size reports the reason, not a number

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
from stepaudio_jax.kernels import flops  # noqa: E402
from stepaudio_jax.kernels.dense_bias import dense_bias_attention  # noqa: E402

BWD_MATMULS_FA2 = 5
GQA = {"gqa12": (12, 1), "gqa8": (16, 2)}


def _implementations(backend: str) -> dict:
  args = dict(bias="alibi_sqrt", causal=True)
  impls = {
      "reference": functools.partial(kernels.attention, implementation="xla", **args),
      "jax_xla": functools.partial(dense_bias_attention, segment_ids=None, positions=None,
                                   implementation="xla", **args),
  }
  if backend in ("tpu", "gpu"):
    impls["pallas"] = functools.partial(kernels.attention, implementation="pallas", **args)
  if backend == "gpu":
    impls["jax_cudnn"] = functools.partial(dense_bias_attention, segment_ids=None,
                                           positions=None, implementation="cudnn", **args)
  return impls


def _time(compiled, args, iters: int) -> float:
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _measure(fn, args, iters: int, work: float) -> dict:
  try:
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    seconds = _time(compiled, args, iters)
  except Exception as e:  # noqa: BLE001  (an OOM at 16k is a result, not a crash)
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
  return {"ms": seconds * 1e3, "tflops": work / seconds / 1e12, "peak_mib": peak / 2**20}


def run(seqs, batch: int, iters: int, dtype) -> list[dict]:
  backend = jax.default_backend()
  rows = []
  for gqa, (n, kv) in GQA.items():
    for t in seqs:
      keys = jax.random.split(jax.random.key(0), 3)
      q = jax.random.normal(keys[0], (batch, t, n, 128), dtype)
      k = jax.random.normal(keys[1], (batch, t, kv, 128), dtype)
      v = jax.random.normal(keys[2], (batch, t, kv, 128), dtype)
      fwd_work = flops.attention_flops(batch, t, n, 128, True, flops.FWD_MATMULS)
      both_work = flops.attention_flops(batch, t, n, 128, True,
                                        flops.FWD_MATMULS + BWD_MATMULS_FA2)
      for name, attn in _implementations(backend).items():
        loss = lambda q, k, v, attn=attn: jnp.sum(attn(q, k, v).astype(jnp.float32))  # noqa: E731
        rows.append({
            "impl": name, "gqa": gqa, "heads": n, "kv_heads": kv, "seq": t, "batch": batch,
            "forward": _measure(attn, (q, k, v), iters, fwd_work),
            "forward_backward": _measure(jax.grad(loss, (0, 1, 2)), (q, k, v), iters,
                                         both_work),
        })
  return rows


def _cell(m: dict) -> str:
  if "error" in m:
    return f"{'error':>26}"
  return f"{m['tflops']:8.3f} {m['ms']:9.2f} {m['peak_mib']:8.0f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seqs", default=None, help="comma-separated sequence lengths")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--dtype", default="bfloat16")
  a = parser.parse_args()
  backend = jax.default_backend()
  on_accelerator = backend in ("tpu", "gpu")
  default = "2048,4096,8192,16384" if on_accelerator else "512,1024"
  seqs = [int(s) for s in (a.seqs or default).split(",")]
  if not on_accelerator:
    print(f"backend {backend}: the Pallas kernel needs an accelerator (TPU or GPU); timing only "
          f"the reference paths at reduced sizes {seqs}")
  rows = run(seqs, a.batch, a.iters, jnp.dtype(a.dtype))
  print(f"device: {jax.devices()[0].device_kind}  dtype {a.dtype}  head_dim 128  causal "
        f"sqrt-ALiBi  batch {a.batch}")
  print(f"{'impl':<10} {'gqa':<6} {'seq':>6} | {'fwd TF/s':>8} {'ms':>9} {'peakMiB':>8} | "
        f"{'f+b TF/s':>8} {'ms':>9} {'peakMiB':>8}")
  for r in rows:
    print(f"{r['impl']:<10} {r['gqa']:<6} {r['seq']:>6} | {_cell(r['forward'])} | "
          f"{_cell(r['forward_backward'])}")
  for r in rows:
    for part in ("forward", "forward_backward"):
      if "error" in r[part]:
        print(f"{r['impl']} {r['gqa']} T={r['seq']} {part}: {r[part]['error']}")
  print(json.dumps({"backend": backend, "device": jax.devices()[0].device_kind,
                    "dtype": a.dtype, "pallas_timed": on_accelerator, "rows": rows}))


if __name__ == "__main__":
  main()
