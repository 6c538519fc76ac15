"""Time the jitted train step: tokens/s, FLOP/s against a measured matmul peak, memory, PyTorch.

  python benchmarks/train_step.py CONFIG [key=value ...] [--steps N] [--warmup N] [--no-torch]
                                  [--against key=value ... [--rounds R]]
  python benchmarks/train_step.py configs/bench.yaml                                # Step1
  python benchmarks/train_step.py configs/bench.yaml model.position_encoding=rope   # vs PyTorch

One invocation times one model variant on one JAX device (on CPU, the whole host), the step
compiled as the trainer compiles it (same shardings, donated state, a fixed synthetic batch).

  tokens/s         batch_size * seq_len / the median of --steps timed steps after --warmup
  achieved FLOP/s  flops.train_step_flops(cfg, batch_size) / that median step time. The count
                   is analytic model work, documented in stepaudio_jax/models/flops.py: 6 FLOPs
                   per matmul parameter per token (LM head included) plus 12 * L * N * H * T_avg
                   per token for causal attention; remat recompute is not counted.
  matmul peak      progress.measure_matmul_peak(PEAK_MATMUL_SIZE) in the config's compute dtype,
                   the better of two runs, before and after the timed steps; "MFU" is achieved
                   FLOP/s over it. "host busy" is the process's CPU time over the wall time of
                   all cores while timing: far below 100% means something else shared the host.
  compiled bytes   memory_analysis() of the compiled step: argument + output + temp - alias
                   (the donated state is aliased to the new state, so it is counted once).
  analytic bytes   flops.train_memory_estimate: params + grads + Adam moments + activations.
  PyTorch          with position_encoding=rope: transformers' LlamaForCausalLM at the same sizes,
                   fp32 on CPU, the same batch; a step is forward + loss + backward + gradient
                   clipping (when the config clips) + torch.optim.AdamW. Llama gets the packed
                   positions but no segment mask (SDPA's causal path; the work is the same).
                   Skipped for ALiBi (Llama has no such variant), with --no-torch, or without
                   torch and transformers.

  --against        a second JAX variant (the same overrides plus these), compiled beside the
                   first and timed in alternating rounds: the A/B ratio of one process.

The table is for people; the last line printed is one JSON object with every number.
"""

import argparse
import contextlib
import json
import math
import os
import statistics
import time

from stepaudio_jax.launch import prefer_cpu_without_accelerators

prefer_cpu_without_accelerators()  # before jax: no TPU-runtime errors on a CPU-only host

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from stepaudio_jax.config.model import PositionEncoding  # noqa: E402
from stepaudio_jax.data.synthetic import SyntheticSource, TRAIN_SPLIT  # noqa: E402
from stepaudio_jax.models import flops as flops_lib  # noqa: E402
from stepaudio_jax.tasks.registry import load_config  # noqa: E402
from stepaudio_jax.training.progress import measure_matmul_peak  # noqa: E402
from stepaudio_jax.training.setup import setup  # noqa: E402

PEAK_MATMUL_SIZE = 2048  # fp32 on 2 CPU cores: ~0.2 s per product, best-of-5 within ~2%


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config")
  p.add_argument("overrides", nargs="*", help="section.key=value")
  p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
  p.add_argument("--against", nargs="+", metavar="KEY=VALUE", default=[],
                 help="also time the step with these overrides added, in alternating rounds "
                      "with the first (an A/B from one process)")
  p.add_argument("--rounds", type=int, default=2, help="alternating rounds with --against")
  return p.parse_args(argv)


def median_seconds(run, steps: int, warmup: int) -> tuple[float, float]:
  """Median wall time of run() (which must block until its result is ready), and the share of
  the host's cores this process kept busy meanwhile: well below 1, other work shared the host
  and the times are slow."""
  for _ in range(warmup):
    run()
  times = []
  cpu_start, wall_start = time.process_time(), time.perf_counter()
  for _ in range(steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  busy = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start) / os.cpu_count()
  return statistics.median(times), busy


def host_batch(cfg) -> dict[str, np.ndarray]:
  """One global batch of the synthetic data the trainer would see at step 0."""
  source = SyntheticSource(cfg.synthetic, cfg.tokens, cfg.vision, cfg.train.seq_len,
                           cfg.train.seed)
  return source.batch(TRAIN_SPLIT, 0, range(cfg.train.batch_size))


def compile_step(cfg, batch: dict):
  """(compiled step, state, device batch), jitted exactly as the trainer jits it."""
  run = setup(cfg, jax.devices()[:1])
  with jax.set_mesh(run.mesh):
    state = run.init()
    device_batch = jax.device_put(batch, run.batch_shardings)
    compiled = run.train.lower(state, device_batch).compile()
  return compiled, state, device_batch


def compiled_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def time_jax_rounds(variants, steps: int, warmup: int, rounds: int) -> list[tuple[float, float]]:
  """(seconds, busy) per (compiled, state, batch) variant: the mean of its median_seconds over
  `rounds` rounds that take the variants in turn, so a drift in the host's speed (10-20%
  between minutes on shared machines) reaches every variant alike. The state is donated, so
  each step feeds the next."""
  carries = [{"state": state} for _, state, _ in variants]
  timings = [[] for _ in variants]
  for r in range(rounds):
    for carry, (compiled, _, batch), timing in zip(carries, variants, timings):
      def run(carry=carry, compiled=compiled, batch=batch):
        carry["state"], carry["metrics"] = compiled(carry["state"], batch)
        jax.block_until_ready(carry["metrics"])

      timing.append(median_seconds(run, steps, warmup if r == 0 else 1))
  for carry in carries:
    loss = float(carry["metrics"]["loss"])
    if not math.isfinite(loss):
      raise FloatingPointError(f"the JAX train step produced loss {loss}")
  return [tuple(statistics.mean(t[i] for t in timing) for i in (0, 1)) for timing in timings]


def torch_skip_reason(cfg, no_torch: bool) -> str | None:
  if no_torch:
    return "--no-torch"
  if cfg.model.position_encoding != PositionEncoding.ROPE:
    return "only the rope variant has a Llama twin (add model.position_encoding=rope)"
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    return f"torch/transformers not installed ({e.name})"
  return None


def llama_twin(model_cfg):
  """transformers' LlamaForCausalLM with the Step1 sizes: no biases, untied head, fp32."""
  from transformers import LlamaConfig, LlamaForCausalLM

  m = model_cfg
  config = LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
      num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim,
      intermediate_size=m.intermediate_size, max_position_embeddings=m.max_seq_len,
      rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta, attention_bias=False,
      mlp_bias=False, tie_word_embeddings=False, initializer_range=m.init_std,
  )
  return LlamaForCausalLM(config).float()


def llama_step(cfg, batch: dict, part=None):
  """(model, run): transformers' Llama twin with AdamW, and run() one train step of it on the
  batch (masked mean cross-entropy). part(name), when given, is a context manager around the
  loss and the optimizer (profile_step.py's profiler ranges)."""
  import torch

  part = part or (lambda name: contextlib.nullcontext())
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(cfg.train.seed)
  model = llama_twin(cfg.model).train()
  o = cfg.optimizer
  opt = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                          weight_decay=o.weight_decay)
  tokens = torch.from_numpy(batch["tokens"]).long()
  positions = torch.from_numpy(batch["positions"]).long()
  targets = torch.from_numpy(batch["targets"]).long()
  mask = torch.from_numpy(batch["loss_mask"])

  def run():
    logits = model(input_ids=tokens, position_ids=positions).logits
    with part("lm head + loss"):
      losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                 reduction="none")
      loss = (losses * mask.flatten()).sum() / mask.sum().clamp(min=1.0)
    with part("optimizer + clipping"):
      opt.zero_grad(set_to_none=True)
    loss.backward()
    with part("optimizer + clipping"):
      if o.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
      opt.step()

  return model, run


def time_torch(cfg, batch: dict, steps: int, warmup: int) -> tuple[float, float]:
  """median_seconds of a PyTorch train step on the same batch."""
  _, run = llama_step(cfg, batch)
  return median_seconds(run, steps, warmup)


def torch_matmul_flops(n: int, dtype: str, repeats: int = 5) -> float:
  """Achieved FLOP/s of one n x n matmul in PyTorch (best of `repeats`): the same measurement
  as progress.measure_matmul_peak, so the two libraries' matmul rates compare side by side."""
  import torch

  a = torch.randn(n, n, dtype=getattr(torch, dtype))
  a @ a
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def gib(n: float) -> str:
  return f"{n / 2**30:.3f} GiB"


def print_table(r: dict) -> None:
  rows = [
      ("config", f"{r['config']} ({r['position_encoding']}, remat={r['remat']}, "
                 f"batch {r['batch_size']} x seq {r['seq_len']})"),
      ("device", f"{r['device_kind']}, jax {r['jax_version']}"),
      ("JAX step time", f"{r['step_seconds'] * 1e3:.1f} ms (median of {r['steps']}; host "
                        f"{100 * r['host_busy']:.0f}% busy)"),
      ("JAX tokens/s", f"{r['tokens_per_s']:,.0f}"),
      ("analytic FLOPs / step", f"{r['step_flops']:.4g}"),
      ("achieved FLOP/s", f"{r['achieved_flops'] / 1e9:.2f} GFLOP/s"),
      ("matmul peak (measured)", f"{r['matmul_peak_flops'] / 1e9:.2f} GFLOP/s "
                                 f"({r['peak_matmul_size']}^2 {r['compute_dtype']})"),
      ("MFU vs measured peak", f"{100 * r['mfu_vs_measured_peak']:.1f}%"),
      ("compiled peak memory", f"{gib(r['compiled_peak_bytes'])} (argument + output + temp "
                               "- alias)"),
      ("analytic memory", f"{gib(r['analytic_bytes'])} (params + grads + Adam + activations)"),
      ("compiled / analytic", f"{r['compiled_over_analytic']:.2f}"),
  ]
  if r.get("against"):
    rows += [
        (f"JAX + {' '.join(r['against'])}", f"{r['against_step_seconds'] * 1e3:.1f} ms (host "
                                            f"{100 * r['against_host_busy']:.0f}% busy)"),
        ("  its time / the first's", f"{r['against_over_base']:.3f} (mean of {r['rounds']} "
                                     "alternating rounds' medians each)"),
    ]
  if r["torch_tokens_per_s"] is None:
    rows.append(("PyTorch", f"skipped: {r['torch_skipped']}"))
  else:
    rows += [
        ("PyTorch step time", f"{r['torch_step_seconds'] * 1e3:.1f} ms (host "
                              f"{100 * r['torch_host_busy']:.0f}% busy; torch "
                              f"{r['torch_version']}, {r['torch_threads']} threads)"),
        ("PyTorch tokens/s", f"{r['torch_tokens_per_s']:,.0f}"),
        ("PyTorch matmul (measured)", f"{r['torch_matmul_flops'] / 1e9:.2f} GFLOP/s "
                                      f"({r['peak_matmul_size']}^2 {r['compute_dtype']})"),
        ("JAX speedup vs PyTorch", f"{r['speedup_vs_torch']:.2f}x"),
    ]
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f"{k:<{width}}  {v}")


def run_benchmark(args) -> dict:
  cfg = load_config(args.config, args.overrides, num_devices=1)
  tc, m = cfg.train, cfg.model
  tokens = tc.batch_size * tc.seq_len
  batch = host_batch(cfg)
  variants = [compile_step(cfg, batch)]
  if args.against:
    other = load_config(args.config, [*args.overrides, *args.against], num_devices=1)
    variants.append(compile_step(other, host_batch(other)))
  compiled = variants[0][0]
  dtype = jnp.dtype(m.compute_dtype.value)
  peak_before = measure_matmul_peak(PEAK_MATMUL_SIZE, dtype)
  timings = time_jax_rounds(variants, args.steps, args.warmup,
                            args.rounds if args.against else 1)
  seconds, busy = timings[0]
  step_flops = flops_lib.train_step_flops(cfg, tc.batch_size)
  peak = max(peak_before, measure_matmul_peak(PEAK_MATMUL_SIZE, dtype))
  analytic = flops_lib.train_memory_estimate(cfg, tc.batch_size // tc.grad_accum_steps).total
  result = {
      "config": os.path.splitext(os.path.basename(args.config))[0],
      "overrides": list(args.overrides),
      "position_encoding": m.position_encoding.value,
      "remat": m.remat.value,
      "compute_dtype": m.compute_dtype.value,
      "batch_size": tc.batch_size,
      "seq_len": tc.seq_len,
      "steps": args.steps,
      "step_seconds": seconds,
      "host_busy": busy,
      "tokens_per_s": tokens / seconds,
      "step_flops": step_flops,
      "achieved_flops": step_flops / seconds,
      "peak_matmul_size": PEAK_MATMUL_SIZE,
      "matmul_peak_flops": peak,
      "compiled_peak_bytes": compiled_bytes(compiled),
      "analytic_bytes": analytic,
      "jax_version": jax.__version__,
      "device_kind": jax.devices()[0].device_kind,
  }
  result["mfu_vs_measured_peak"] = result["achieved_flops"] / result["matmul_peak_flops"]
  result["compiled_over_analytic"] = result["compiled_peak_bytes"] / analytic
  if args.against:
    result.update(against=list(args.against), rounds=args.rounds,
                  against_step_seconds=timings[1][0], against_host_busy=timings[1][1],
                  against_over_base=timings[1][0] / seconds)
  result.update(torch_result(cfg, batch, args, tokens, seconds))
  return result


def torch_result(cfg, batch, args, tokens: int, jax_seconds: float) -> dict:
  skipped = torch_skip_reason(cfg, args.no_torch)
  if skipped:
    return {"torch_tokens_per_s": None, "speedup_vs_torch": None, "torch_skipped": skipped}
  import torch

  seconds, busy = time_torch(cfg, batch, args.steps, args.warmup)
  return {
      "torch_matmul_flops": torch_matmul_flops(PEAK_MATMUL_SIZE, cfg.model.compute_dtype.value),
      "torch_step_seconds": seconds,
      "torch_host_busy": busy,
      "torch_tokens_per_s": tokens / seconds,
      "speedup_vs_torch": seconds / jax_seconds,
      "torch_version": torch.__version__,
      "torch_threads": torch.get_num_threads(),
      "torch_skipped": None,
  }


def main(argv=None) -> None:
  result = run_benchmark(parse_args(argv))
  print_table(result)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
