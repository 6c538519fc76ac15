"""The scale table: chips, mesh, memory per chip, estimated MFU and tokens/s of the big configs.

  python benchmarks/compile_table.py          # GPU clusters, from memory and bandwidth arithmetic
  python benchmarks/compile_table.py --tpu    # + TPU slices, compiled here with libtpu (minutes
                                              #   per row: `stepaudio compile` for each)

GPU rows are arithmetic, not a compile: no GPU compiler runs here. Mesh: tensor parallel inside
a node (NVLink; 8 ways for the 130B, none for the 3B), FSDP across nodes (InfiniBand, 400 Gb/s
per GPU; NVLink within one node of 8), the largest microbatch that fits, full remat, bf16
compute, fp32 parameters, gradients and Adam moments.
  memory per GPU = 16 B x params / GPUs + saved residuals (layers x rows x T x D x 2 B)
                   + one layer's live activations and gathered weights + the fp32 logits and
                   their gradient (T x V / tensor x 8 B per row)
  time           = (model FLOPs x 4/3 for the remat forward) / peak + the tensor-parallel
                   all-reduces (6 per layer of rows x T x D x 2 B, ring, NVLink), or the FSDP
                   weight all-gathers (3 per layer, bf16) and gradient reduce-scatter (fp32)
                   over InfiniBand if those take longer (they overlap the compute)
  MFU            = model FLOPs / (time x GPUs x peak): an upper bound, no kernel inefficiency;
                   the Step-Audio report measured 35% on H800s, Megatron-LM 41-48% on H100s.
"""

import argparse
import dataclasses
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from stepaudio_jax.models import flops as flops_lib
from stepaudio_jax.tasks.registry import load_config


@dataclasses.dataclass(frozen=True)
class Gpu:
  name: str
  hbm: float  # bytes
  peak: float  # bf16 dense FLOP/s
  nvlink: float  # bytes/s per GPU, one direction
  ib: float = 50e9  # bytes/s per GPU (400 Gb/s)


GPUS = (Gpu("H100", 80e9, 989e12, 450e9), Gpu("H800", 80e9, 989e12, 200e9))
# (config, overrides, tensor-parallel ways, GPU counts): the 130B at the report's 512 x
# 4,096-token batch, tensor 8 in a node; the 3B TTS LM at 64 x 4,096, pure FSDP.
GPU_ROWS = (
    ("configs/step_omni_130b_v5p.yaml", ["vision.enabled=false"], 8, (256, 512, 1024)),
    ("configs/model/step-audio-tts-3b.yaml", ["train.batch_size=64"], 1, (8, 64)),
)
# (config, overrides, topology): the rows `--tpu` compiles.
TPU_ROWS = (
    ("configs/step_omni_130b_v5p.yaml", [], "v5p:8x8x8"),
    # 1,024 chips, 512 rows: every chip needs half a row, split by tensor (or mesh.sequence)
    ("configs/step_omni_130b_v5p.yaml", ["mesh.fsdp=512", "mesh.tensor=2"], "v5p:8x8x16"),
    # 32k context, 64 rows: 8 chips per row, whose residual stream only mesh.sequence splits
    ("configs/step_omni_130b_v5p.yaml", ["train.seq_len=32768", "train.batch_size=64",
                                         "model.max_seq_len=32768", "mesh.fsdp=64",
                                         "mesh.sequence=4", "mesh.tensor=2"], "v5p:8x8x8"),
    ("configs/model/step-audio-tts-3b.yaml",
     ["train.batch_size=64", "model.attention=pallas", "model.remat=save_mlp"], "v5p:2x2x2"),
    ("configs/model/step-audio-tts-3b.yaml",  # 1 row per chip: gathered weights, no loops
     ["train.batch_size=64", "model.attention=pallas", "model.remat=save_mlp"], "v5p:4x4x4"),
)


def gpu_row(cfg, gpu: Gpu, gpus: int, tensor: int) -> dict:
  """The largest microbatch that fits (rows per FSDP rank, halved until it does)."""
  m, t, b = cfg.model, cfg.train.seq_len, cfg.train.batch_size
  fsdp = gpus // tensor
  rows = b // fsdp  # per step and tensor-parallel group (all its GPUs see the same rows)
  step = flops_lib.train_step_flops(cfg, b)
  layer_params = (flops_lib.lm_matmul_params(m) - m.hidden_size * m.vocab_size) / m.num_layers
  width = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim * 2 + 3 * m.intermediate_size

  def memory(micro):
    return (16 * m.num_params() / gpus
            + m.num_layers * micro * t * m.hidden_size * 2
            + micro * t * (width / tensor + 4 * m.hidden_size) * 2
            + 2 * 2 * layer_params / tensor + micro * t * m.vocab_size / tensor * 8)

  micro = rows
  while micro > 1 and memory(micro) > gpu.hbm:
    micro //= 2
  compute = step * 4 / 3 / gpus / gpu.peak
  tp = m.num_layers * 6 * 2 * (tensor - 1) / tensor * rows * t * m.hidden_size * 2 / gpu.nvlink
  fsdp_bytes = (rows // micro) * m.num_layers * layer_params / tensor * (3 * 2 + 4) * (
      fsdp - 1) / fsdp
  seconds = max(compute + tp, fsdp_bytes / (gpu.nvlink if gpus <= 8 else gpu.ib))
  return {"chips": f"{gpus} {gpu.name}",
          "mesh": f"fsdp {fsdp} x tensor {tensor}, {rows // micro} microbatches",
          "memory": memory(micro) / 2**30, "fits": memory(micro) <= gpu.hbm,
          "seconds": seconds, "mfu": step / (seconds * gpus * gpu.peak), "tokens": b * t / seconds}


def tpu_row(config: str, overrides: list[str], topology: str) -> dict:
  from stepaudio_jax.training import aot

  cfg = load_config(os.path.join(REPO, config), overrides)
  report, _ = aot.compile_train_step(cfg, topology)
  est = aot.estimate_step_time(cfg, topology)
  mesh = " x ".join(f"{k} {v}" for k, v in report.mesh.items() if v > 1)
  return {"chips": f"{report.chips} ({topology})", "mesh": mesh,
          "memory": report.bytes_per_chip / 2**30, "fits": report.fits, "seconds": est.seconds,
          "mfu": est.mfu, "tokens": est.tokens_per_second}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tpu", action="store_true", help="also compile the TPU rows (slow)")
  args = parser.parse_args()
  print("| config | chips | mesh | memory per chip | fits | step | est. MFU | est. tokens/s |")
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  if args.tpu:
    rows += [(c, tpu_row(c, o, topo)) for c, o, topo in TPU_ROWS]
  for config, overrides, tensor, counts in GPU_ROWS:
    cfg = load_config(os.path.join(REPO, config), overrides)
    rows += [(config, gpu_row(cfg, gpu, n, tensor)) for gpu in GPUS for n in counts]
  for config, r in rows:
    print(f"| {os.path.basename(config)} | {r['chips']} | {r['mesh']} | {r['memory']:.1f} GiB | "
          f"{'yes' if r['fits'] else 'no'} | {r['seconds']:.2f} s | {r['mfu']:.1%} | "
          f"{r['tokens']:,.0f} |")


if __name__ == "__main__":
  main()
