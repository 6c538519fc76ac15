"""Peak host memory of `stepaudio export` against the size of the model it exports.

  python benchmarks/export.py [--layers 8 16] [--hidden 1024] [--vocab 32768] [--devices 8]
                              [--dtype bfloat16] [--keep DIR]

For each --layers value (one model size each):
1. A subprocess writes a synthetic checkpoint of a Step1 LM (RUN/config.yaml and the `params`
   of RUN/checkpoints/0/state, Orbax OCDBT, sharded over --devices emulated CPU devices on the
   fsdp axis as the trainer saves it), so its chunks are one device shard each.
2. A fresh subprocess runs the export (exporter.export_checkpoint) and reports its peak resident
   memory (resource.getrusage ru_maxrss) and wall time.
Once: another fresh subprocess imports the same modules and does nothing: its peak RSS is the
baseline of Python + jax + tensorstore.

  export overhead = peak RSS of the export - baseline RSS: what the export itself needed.
  bound           = largest exported tensor + a constant: 2 stored chunks (compressed and
                    decoded) + one block of exporter.BLOCK_BYTES (read, and converted) + 64 MiB
                    of runtime (tensorstore threads and heaps, the trimmed malloc arenas).
Every size is several times larger than the bound, so a whole-model read would show, and the
overhead must not grow with the checkpoint between sizes (only the chunk term may, because a
stacked [L, ...] array is stored with all L layers in each chunk).
The table is for people; the last line printed is one JSON object with every number.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MAKE = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + sys.argv[2]
os.environ["JAX_PLATFORMS"] = "cpu"
import json
import jax, jax.numpy as jnp
import orbax.checkpoint as ocp
from stepaudio_jax.config import dump_config
from stepaudio_jax.parallel.mesh import LogicalSharding, logical_axes, make_mesh
from stepaudio_jax.tasks.registry import load_config
run, overrides = sys.argv[1], json.loads(sys.argv[3])
cfg = load_config(sys.argv[4], overrides, num_devices=jax.device_count())
dump_config(cfg, os.path.join(run, "config.yaml"))
shard = LogicalSharding.create(make_mesh(cfg.mesh), cfg.mesh.rules)
from flax import nnx
from stepaudio_jax.models.step1 import Step1
lm = nnx.eval_shape(lambda: Step1(cfg.model, rngs=nnx.Rngs(0)))
shapes = nnx.to_pure_dict(nnx.state(lm))
shardings = shard.tree(logical_axes(nnx.state(lm)))
leaves, tree = jax.tree.flatten(shapes)
keys = jax.random.split(jax.random.key(0), len(leaves))
def make(k, s, sh):
  return jax.jit(lambda k: 0.02 * jax.random.normal(k, s.shape, jnp.float32), out_shardings=sh)(k)
params = jax.tree.unflatten(tree, [make(k, s, sh) for k, s, sh in
                                   zip(keys, leaves, jax.tree.leaves(shardings))])
ckpt = ocp.StandardCheckpointer()
ckpt.save(os.path.join(run, "checkpoints", "0", "state"), {"params": {"model": {"lm": params}}})
ckpt.wait_until_finished()
os.makedirs(os.path.join(run, "checkpoints", "0", "data"))
with open(os.path.join(run, "checkpoints", "0", "data", "metadata"), "w") as f:
  json.dump({"step": 0, "layout": 2}, f)
"""

RUNTIME_BYTES = 64 * 2**20

EXPORT = """
import json, resource, sys, time
from stepaudio_jax.export.exporter import export_checkpoint
t = time.perf_counter()
s = export_checkpoint(sys.argv[1], sys.argv[2], dtype=sys.argv[3], max_shard_size="2GB")
print(json.dumps({"seconds": time.perf_counter() - t, "total_bytes": s.total_bytes,
                  "largest_tensor_bytes": s.largest_tensor_bytes, "num_tensors": s.num_tensors,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

BASELINE = """
import json, resource
import numpy, tensorstore
from stepaudio_jax.export import exporter
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _run(code: str, *args: str) -> dict:
  out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True,
                       text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


def _stored_bytes(run: str) -> tuple[int, int]:
  """Total bytes of the checkpoint's arrays and of its largest chunk (from the zarr metadata)."""
  from stepaudio_jax.export.orbax_reader import CheckpointReader

  reader = CheckpointReader(run)
  total = largest_chunk = 0
  for path in reader.paths:
    store = reader._store(path)  # noqa: SLF001  (a benchmark may look at the chunk layout)
    item = store.dtype.numpy_dtype.itemsize
    total += item * store.size
    chunk = store.chunk_layout.read_chunk.shape
    size = item
    for c in chunk:
      size *= c
    largest_chunk = max(largest_chunk, size)
  return total, largest_chunk


def _measure(a, layers: int, work: str, repo: str) -> dict:
  """Make a checkpoint with `layers` layers, export it; sizes, peak RSS and times."""
  from stepaudio_jax.export.exporter import BLOCK_BYTES

  heads = a.hidden // 64
  overrides = [f"model.vocab_size={a.vocab}", f"model.hidden_size={a.hidden}",
               f"model.num_layers={layers}", f"model.num_heads={heads}",
               f"model.num_kv_heads={max(1, heads // 4)}", "model.head_dim=64",
               f"model.intermediate_size={a.hidden * 11 // 4}", "tokens.text_vocab_size=1024",
               "tokens.linguistic_codes=64", "tokens.semantic_codes=64", "train.seq_len=128",
               "mesh.fsdp=-1"]
  run, out = os.path.join(work, f"run{layers}"), os.path.join(work, f"hf{layers}")
  os.makedirs(run, exist_ok=True)
  t = time.perf_counter()
  _run(MAKE, run, str(a.devices), json.dumps(overrides), os.path.join(repo, "configs", "base.yaml"))
  make_s = time.perf_counter() - t
  stored, chunk = _stored_bytes(run)
  exp = _run(EXPORT, run, out, a.dtype)
  out_item = 2 if a.dtype == "bfloat16" else 4
  block = BLOCK_BYTES + BLOCK_BYTES // 4 * out_item
  return {
      "layers": layers, "hidden": a.hidden, "vocab": a.vocab, "devices": a.devices,
      "dtype": a.dtype, "checkpoint_param_bytes": stored, "largest_stored_chunk_bytes": chunk,
      "export_bytes": exp["total_bytes"],
      "largest_export_tensor_bytes": exp["largest_tensor_bytes"], "block_bytes": block,
      "bound_bytes": exp["largest_tensor_bytes"] + 2 * chunk + block + RUNTIME_BYTES,
      "export_peak_rss_bytes": exp["peak_rss"], "export_seconds": exp["seconds"],
      "make_checkpoint_seconds": make_s,
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, nargs="+", default=[8, 16])
  ap.add_argument("--hidden", type=int, default=1024)
  ap.add_argument("--vocab", type=int, default=32768)
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  ap.add_argument("--keep", default="", help="directory to keep the checkpoints and exports in")
  a = ap.parse_args()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  work = a.keep or tempfile.mkdtemp(prefix="stepaudio_export_bench_")
  rows = [_measure(a, layers, work, repo) for layers in a.layers]
  base = _run(BASELINE)["peak_rss"]
  for row in rows:
    row["baseline_rss_bytes"] = base
    row["export_overhead_bytes"] = row["export_peak_rss_bytes"] - base
    row["overhead_over_checkpoint"] = row["export_overhead_bytes"] / row["checkpoint_param_bytes"]
    row["within_bound"] = row["export_overhead_bytes"] <= row["bound_bytes"]
  mb = 1 / 2**20
  print(f"{'MiB':<40}" + "".join(f"{str(r['layers']) + ' layers':>14}" for r in rows))
  for label, key in (("checkpoint params (fp32, stored)", "checkpoint_param_bytes"),
                     ("exported safetensors", "export_bytes"),
                     ("largest stored chunk", "largest_stored_chunk_bytes"),
                     ("largest exported tensor", "largest_export_tensor_bytes"),
                     ("one block (read + converted)", "block_bytes"),
                     ("bound: tensor + 2 chunks + block + 64", "bound_bytes"),
                     ("baseline RSS (imports only)", "baseline_rss_bytes"),
                     ("export peak RSS", "export_peak_rss_bytes"),
                     ("export overhead (peak - baseline)", "export_overhead_bytes")):
    print(f"{label:<40}" + "".join(f"{r[key] * mb:>14.1f}" for r in rows))
  print(f"{'overhead / checkpoint':<40}" + "".join(f"{r['overhead_over_checkpoint']:>14.2f}"
                                                 for r in rows))
  print(f"{'export time (s)':<40}" + "".join(f"{r['export_seconds']:>14.1f}" for r in rows))
  summary = {"runs": rows, "all_within_bound": all(r["within_bound"] for r in rows)}
  if len(rows) > 1:
    lo, hi = rows[0], rows[-1]
    summary["checkpoint_growth_bytes"] = hi["checkpoint_param_bytes"] - lo["checkpoint_param_bytes"]
    summary["overhead_growth_bytes"] = hi["export_overhead_bytes"] - lo["export_overhead_bytes"]
    print(f"{'growth ' + str(lo['layers']) + ' -> ' + str(hi['layers']) + ' layers':<40}"
          f"checkpoint +{summary['checkpoint_growth_bytes'] * mb:.1f}, "
          f"overhead {summary['overhead_growth_bytes'] * mb:+.1f}")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
