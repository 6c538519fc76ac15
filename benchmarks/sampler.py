"""Time the sampler: prefill, then decode tokens/s against the device's memory-bandwidth bound.

  python benchmarks/sampler.py CONFIG [key=value ...] [--batch B] [--prompt-len P]
                               [--new-tokens N] [--temperature T] [--top-p P] [--repeats R]
  python benchmarks/sampler.py configs/bench.yaml          # ~40 s on a 2-core CPU

A Step1 model of the config's `model:` section with random weights (no checkpoint), the
parameters cast to the compute dtype (as a server stores them), on one JAX device. Random
prompts of P tokens, sampled by inference.sampler's jitted sampler.

  prefill          Decoder.prefill of the B x P prompts (a cache of P + N - 1 slots)
  decode step      (sampler with N new tokens - sampler with 1) / (N - 1): one cached forward of
                   B tokens plus the choice (temperature, top-p); medians of R timed runs after a
                   warm-up run, each blocked until ready. "host busy" is the process's CPU time
                   over the wall time of all cores: far below 100%, other work shared the host
  decode tokens/s  B / decode step
  bytes per step   what one decode step must read: the weights in the compute dtype (all but the
                   embedding table, of which only B rows) plus the keys and values filled so far,
                   averaged over the N - 1 steps (P + N/2 slots). The sampler reads its whole
                   cache every step (masked slots included), reported as "as implemented"
  bandwidth        a table for TPU v5p/v5e/v4 and NVIDIA H200/H100/A100 (HBM, per chip); on CPU
                   measured in the same run: the best of several sums of a 512 MiB array
  bound            B / (bytes per step / bandwidth): decode tokens/s if reading memory were all
                   a step did; "of bound" is the measured tokens/s over it

The table is for people; the last line printed is one JSON object with every number.
"""

import argparse
import json
import os
import statistics
import time

from stepaudio_jax.launch import prefer_cpu_without_accelerators

prefer_cpu_without_accelerators()  # before jax: no TPU-runtime errors on a CPU-only host

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from stepaudio_jax.inference import decode  # noqa: E402
from stepaudio_jax.inference.sampler import SamplingConfig, make_sampler  # noqa: E402
from stepaudio_jax.models.step1 import Step1  # noqa: E402
from stepaudio_jax.tasks.registry import load_config  # noqa: E402

# HBM bandwidth per chip, bytes/s, from the vendors' spec sheets; the first prefix that matches
# jax.devices()[0].device_kind wins.
BANDWIDTH = (("TPU v5p", 2765e9), ("TPU v5 lite", 819e9), ("TPU v5e", 819e9), ("TPU v4", 1228e9),
             ("NVIDIA H200", 4.8e12), ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA H100", 3.35e12),
             ("NVIDIA A100-SXM4-80GB", 2.039e12), ("NVIDIA A100 80GB", 1.935e12),
             ("NVIDIA A100", 1.555e12))
CPU_PROBE_BYTES = 512 << 20


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config")
  p.add_argument("overrides", nargs="*", help="section.key=value")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top-p", type=float, default=0.9)
  p.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
  return p.parse_args(argv)


def median_seconds(run, repeats: int) -> float:
  """Median wall time of run() after one untimed call; run must block until it is done."""
  run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def device_bandwidth() -> tuple[float, str]:
  """(bytes/s, where the figure came from) for the default device."""
  kind = jax.devices()[0].device_kind
  for name, bandwidth in BANDWIDTH:
    if kind.startswith(name):
      return bandwidth, f"spec sheet ({name})"
  x = jnp.ones((CPU_PROBE_BYTES // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  best = min(_timed(lambda: total(x).block_until_ready()) for _ in range(5))
  return CPU_PROBE_BYTES / best, f"measured: sum of a {CPU_PROBE_BYTES >> 20} MiB array"


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def step_bytes(cfg, params: dict, batch: int, slots: float) -> tuple[float, float]:
  """(weight bytes, cache bytes) one decode step reads with `slots` cache slots per row."""
  itemsize = jnp.dtype(cfg.compute_dtype.value).itemsize
  weights = sum(x.size for x in jax.tree.leaves(params)) - params["embed"].size
  weights += batch * cfg.hidden_size
  cache = 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim
  return weights * itemsize, cache * itemsize


def run_benchmark(args) -> dict:
  cfg = load_config(args.config, args.overrides, num_devices=1).model
  b, p, n = args.batch, args.prompt_len, args.new_tokens
  dtype = jnp.dtype(cfg.compute_dtype.value)
  build = lambda: Step1(cfg, rngs=nnx.Rngs(0))  # noqa: E731
  params = jax.jit(lambda: jax.tree.map(lambda x: x.astype(dtype),
                                        nnx.to_pure_dict(nnx.state(build()))))()
  model = nnx.eval_shape(build)
  rng = np.random.default_rng(0)
  prompts = decode.left_pad(rng.integers(5, cfg.vocab_size, (b, p)).tolist())
  prompts = jax.device_put(prompts)
  sampler, key = make_sampler(model), jax.random.key(0)
  full = SamplingConfig(n, args.temperature, top_p=args.top_p)
  one = SamplingConfig(1, args.temperature, top_p=args.top_p)
  prefill = decode.make_decoder(model, p + n - 1).prefill

  cpu_start, wall_start = time.process_time(), time.perf_counter()
  prefill_s = median_seconds(lambda: jax.block_until_ready(prefill(params, prompts)),
                             args.repeats)
  first_s = median_seconds(lambda: jax.block_until_ready(sampler(params, prompts, one, key)),
                           args.repeats)
  out = sampler(params, prompts, full, key)
  full_s = median_seconds(lambda: jax.block_until_ready(sampler(params, prompts, full, key)),
                          args.repeats)
  busy = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start) / os.cpu_count()
  steps = max(int(np.asarray(out.lengths).max()) - 1, 1)  # all rows at EOS: fewer steps ran
  step_s = (full_s - first_s) / steps
  bandwidth, bandwidth_from = device_bandwidth()
  weights, cache = step_bytes(cfg, params, b, p + n / 2)
  _, whole_cache = step_bytes(cfg, params, b, p + n - 1)
  result = {
      "config": os.path.splitext(os.path.basename(args.config))[0],
      "overrides": list(args.overrides),
      "compute_dtype": cfg.compute_dtype.value,
      "parameters": sum(x.size for x in jax.tree.leaves(params)),
      "batch": b, "prompt_len": p, "new_tokens": n, "decode_steps": steps,
      "temperature": args.temperature, "top_p": args.top_p, "repeats": args.repeats,
      "host_busy": busy,
      "prefill_seconds": prefill_s,
      "prefill_tokens_per_s": b * p / prefill_s,
      "decode_step_seconds": step_s,
      "decode_tokens_per_s": b / step_s,
      "weight_bytes_per_step": weights,
      "cache_bytes_per_step": cache,
      "bytes_per_step": weights + cache,
      "bytes_per_step_as_implemented": weights + whole_cache,
      "bandwidth_bytes_per_s": bandwidth,
      "bandwidth_from": bandwidth_from,
      "bound_tokens_per_s": b * bandwidth / (weights + cache),
      "achieved_bandwidth_bytes_per_s": (weights + cache) / step_s,
      "device_kind": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
  }
  result["of_bound"] = result["decode_tokens_per_s"] / result["bound_tokens_per_s"]
  return result


def print_table(r: dict) -> None:
  mb = 1e6
  rows = [
      ("config", f"{r['config']} ({r['parameters'] / 1e6:.1f}M parameters, "
                 f"{r['compute_dtype']}), batch {r['batch']}, prompt {r['prompt_len']}, "
                 f"{r['new_tokens']} new tokens (T={r['temperature']}, top-p {r['top_p']})"),
      ("device", f"{r['device_kind']}, jax {r['jax_version']}"),
      ("prefill", f"{r['prefill_seconds'] * 1e3:.1f} ms ({r['prefill_tokens_per_s']:,.0f} "
                  "tokens/s)"),
      ("decode step", f"{r['decode_step_seconds'] * 1e3:.2f} ms (median of {r['repeats']}, "
                      f"{r['decode_steps']} steps; host {100 * r['host_busy']:.0f}% busy)"),
      ("decode tokens/s", f"{r['decode_tokens_per_s']:,.1f}"),
      ("bytes per step", f"{r['bytes_per_step'] / mb:.1f} MB = weights "
                         f"{r['weight_bytes_per_step'] / mb:.1f} + cache so far "
                         f"{r['cache_bytes_per_step'] / mb:.1f} (as implemented, whole cache: "
                         f"{r['bytes_per_step_as_implemented'] / mb:.1f})"),
      ("memory bandwidth", f"{r['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({r['bandwidth_from']})"),
      ("bandwidth bound", f"{r['bound_tokens_per_s']:,.1f} tokens/s"),
      ("of bound", f"{100 * r['of_bound']:.1f}% (achieved "
                   f"{r['achieved_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)"),
  ]
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f"{k:<{width}}  {v}")


def main(argv=None) -> None:
  result = run_benchmark(parse_args(argv))
  print_table(result)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
