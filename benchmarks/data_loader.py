"""Grain loader throughput: tokens/s per CPU core vs the rate one accelerator host consumes.

Writes random shards at the real token layout (examples of 100-1,500 tokens, 224 px images),
runs the stage-3 mixture into packed rows and times it. Needed rate per host:
  tokens/s/host = GPUs/host x peak FLOP/s x MFU / (6 x parameters)
The loader keeps up when (tokens/s per core) x (cores given to it) exceeds that.
Run: python benchmarks/data_loader.py [--workers N] [--steps S]
"""

import argparse
import json
import os
import tempfile
import time


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workers", type=int, default=0)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--batch", type=int, default=4)  # rows per host per step
  p.add_argument("--seq-len", type=int, default=4096)
  p.add_argument("--params", type=float, default=130e9)
  p.add_argument("--gpus-per-host", type=int, default=8)
  p.add_argument("--peak-flops", type=float, default=989e12)  # H800/H100 bf16 dense
  p.add_argument("--mfu", type=float, default=0.35)  # the report's MFU
  args = p.parse_args()

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from stepaudio_jax.config.data import DataConfig, StageConfig
  from stepaudio_jax.config.model import TokenLayout, VisionConfig
  from stepaudio_jax.data.fake import write_fake_shards
  from stepaudio_jax.data.loader import GrainLoader

  layout = TokenLayout()
  vision = VisionConfig(enabled=True, max_images_per_sequence=8)
  stage = StageConfig(audio=4, text=3, image=3, continuation=1, interleaved=1, asr=1, tts=1)
  with tempfile.TemporaryDirectory() as tmp:
    shards = write_fake_shards(tmp, layout, per_task=256, shards=4, min_len=100, max_len=1500)
    cfg = DataConfig(source="grain", shards=shards, stages=[stage], workers=args.workers)
    loader = GrainLoader(cfg, layout, vision, args.seq_len, args.batch, seed=0)
    loader.next_local()  # start-up (worker spawn) is not throughput
    t0 = time.perf_counter()
    pad = 0.0
    for _ in range(args.steps):
      pad += (loader.next_local()["segment_ids"] == 0).mean() / args.steps
    dt = time.perf_counter() - t0
  tokens = args.steps * args.batch * args.seq_len
  cores = max(args.workers, 1)
  per_core = tokens / dt / cores
  host_flops = args.gpus_per_host * args.peak_flops
  need = host_flops * args.mfu / (6 * args.params)
  rows = [("rows x seq_len per step", f"{args.batch} x {args.seq_len}"),
          ("workers (cores used)", f"{args.workers} ({cores})"),
          ("padding fraction", f"{pad:.3f}"),
          ("loader tokens/s", f"{tokens / dt:,.0f}"),
          ("loader tokens/s per core", f"{per_core:,.0f}"),
          ("host FLOP/s", f"{args.gpus_per_host} x {args.peak_flops:.3g} = {host_flops:.3g}"),
          ("needed tokens/s/host", f"{host_flops:.3g} x {args.mfu} / (6 x {args.params:.3g}) "
                                   f"= {need:,.0f}"),
          ("cores needed per host", f"{need:,.0f} / {per_core:,.0f} = {need / per_core:.2f}")]
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f"{k:<{width}}  {v}")
  print(json.dumps({"tokens_per_s": tokens / dt, "tokens_per_s_per_core": per_core,
                    "workers": args.workers, "padding": pad, "needed_tokens_per_s_per_host": need,
                    "cores_needed_per_host": need / per_core}))


if __name__ == "__main__":
  main()
