"""`stepaudio` command line: train, print a resolved config, compile ahead of time for a TPU
slice, export/import Hugging Face models."""

import argparse
import logging
import os
import sys

from stepaudio_jax.launch import FLAGS as LAUNCH_FLAGS
from stepaudio_jax.launch import (
  LaunchError,
  add_flags,
  initialize_distributed,
  prefer_cpu_without_accelerators,
)

# Commands that may run as one process of a multi-process job (every process runs the same one).
DISTRIBUTED_COMMANDS = ("train", "export", "score", "aot")


def _train(args) -> int:
  import jax

  from stepaudio_jax.config import load_config
  from stepaudio_jax.training.trainer import train

  cfg = load_config(args.config, args.overrides, num_devices=jax.device_count(),
                    num_processes=jax.process_count())
  train(cfg)  # writes RUN_DIR/config.yaml once every check has passed
  return 0


def _show_config(args) -> int:
  from stepaudio_jax.config import dump_config, load_config

  dump_config(load_config(args.config, args.overrides), "/dev/stdout")
  return 0


def _aot(args) -> int:
  from stepaudio_jax.config import load_config
  from stepaudio_jax.training.aot import compile_train_step

  cfg = load_config(args.config, args.overrides)
  report, _ = compile_train_step(cfg, args.topology, args.num_slices)
  gib = 1 << 30
  print(f"{args.config} on {report.topology} ({report.chips} chips, mesh {report.mesh})")
  print(f"  compiled bytes per chip  {report.bytes_per_chip / gib:8.2f} GiB "
        f"(HBM {report.hbm_per_chip / gib:.0f} GiB: {'fits' if report.fits else 'DOES NOT FIT'})")
  print(f"  analytic estimate        {report.analytic_bytes_per_chip / gib:8.2f} GiB")
  print(f"  model FLOPs per step     {report.step_flops:.3e}")
  return 0 if report.fits else 1


def _export(args) -> int:
  import jax

  from stepaudio_jax.export.exporter import export_checkpoint

  summary = export_checkpoint(
      args.checkpoint, args.out_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
      tokenizer_model=args.tokenizer, process_index=jax.process_index(),
      process_count=jax.process_count(), overwrite=args.overwrite,
  )
  if jax.process_count() > 1:  # the directory is complete only when every process is done
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("stepaudio export")
  if jax.process_index() == 0:
    print(f"exported step {summary.step} as {summary.architecture} to {summary.out_dir}: "
          f"{summary.num_tensors} tensors, {summary.total_bytes / 1e6:.1f} MB")
  return 0


def _score(args) -> int:
  import numpy as np

  from stepaudio_jax.export.score import score

  try:
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
  except ValueError:
    print(f"stepaudio score: error: --tokens {args.tokens!r} must be comma-separated integers",
          file=sys.stderr)
    return 2
  logits = score(args.checkpoint, tokens)
  np.save(args.out, logits)
  print(f"wrote logits {list(logits.shape)} (float32) to {args.out}")
  return 0


def _import(args) -> int:
  from stepaudio_jax.export.hf_import import import_hf

  step_dir = import_hf(args.hf_dir, args.checkpoint_dir, config=args.config,
                       overrides=args.overrides, vision_dir=args.vision)
  print(f"imported {args.hf_dir} into {step_dir}")
  return 0


def _add_export_commands(sub) -> None:
  p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model (safetensors)")
  p.add_argument("checkpoint", help="run directory (newest complete step) or a step directory")
  p.add_argument("out_dir", help="output directory")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
  p.add_argument("--tokenizer", default="", help="sentencepiece tokenizer.model to ship with it")
  p.add_argument("--overwrite", action="store_true",
                 help="export into a non-empty out_dir, replacing the model files there (weights, "
                      "index, config, tokenizer) and keeping any other file")
  p.set_defaults(fn=_export)

  p = sub.add_parser("score", help="write the model's float32 logits [seq, vocab] for token ids")
  p.add_argument("checkpoint", help="run directory (newest complete step) or a step directory")
  p.add_argument("--tokens", required=True, help="comma-separated token ids, e.g. 1,5,9")
  p.add_argument("--out", required=True, help="output .npy file")
  p.set_defaults(fn=_score)

  p = sub.add_parser("import", help="a Hugging Face Step1/Llama model -> a run directory")
  p.add_argument("hf_dir", help="directory with config.json and safetensors")
  p.add_argument("checkpoint_dir", help="run directory to create (checkpoints/0 + config.yaml)")
  p.add_argument("--config", default="configs/base.yaml",
                 help="run config for everything config.json does not say (tokens, mesh, ...)")
  p.add_argument("--vision", default="", help="SigLIP vision model directory for the encoder")
  p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mesh.fsdp=2")
  p.set_defaults(fn=_import)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="stepaudio", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, fn, text in (("train", _train, "train a model from a config"),
                         ("show-config", _show_config, "print the resolved config")):
    p = sub.add_parser(name, help=text)
    p.add_argument("config", help="YAML config file (configs/...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    p.set_defaults(fn=fn)
  p = sub.add_parser("aot", help="compile the train step for a TPU slice here; report memory")
  p.add_argument("config", help="YAML config file (configs/...)")
  p.add_argument("--topology", default="v5p:8x8x8", help="TPU slice, e.g. v5p:8x8x8")
  p.add_argument("--num-slices", type=int, default=1)
  p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=512")
  p.set_defaults(fn=_aot)
  _add_export_commands(sub)
  for name in DISTRIBUTED_COMMANDS:
    add_flags(sub.choices[name])
  args, extra = parser.parse_known_args(argv)
  if extra:  # argparse leaves `key=value` after an option (`import A B --config C k=v`) over
    if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
      parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides += extra
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  prefer_cpu_without_accelerators()
  # A failed save surfaces as one CheckpointError from our checkpointer; Orbax's background
  # threads would also log it, with tracebacks, once per thread.
  logging.getLogger("absl").addFilter(
      lambda r: r.levelno < logging.ERROR or "/orbax/" not in r.pathname)
  from stepaudio_jax.config import ConfigError
  from stepaudio_jax.data.records import RecordError, ShardError
  from stepaudio_jax.data.source import LoaderStateError
  from stepaudio_jax.export.orbax_reader import ExportError
  from stepaudio_jax.training.checkpoint import CheckpointError

  # Expected failures: bad input or a broken environment, each explained by its message (the
  # thing and the fix); anything else is a bug and keeps its traceback. FloatingPointError is
  # a diverged run (hooks.check_finite); OSError an I/O failure such as a read-only directory.
  expected = (ConfigError, CheckpointError, ExportError, LaunchError, RecordError, ShardError,
              LoaderStateError, FloatingPointError, OSError)
  try:
    if args.command in DISTRIBUTED_COMMANDS:  # before anything asks JAX for devices
      initialize_distributed({k: getattr(args, k) for k in LAUNCH_FLAGS})
    return args.fn(args)
  except expected as e:
    print(f"stepaudio {args.command}: error: {e}", file=sys.stderr)
    return 2


def run() -> None:
  """The `stepaudio` command: after an error, exit without the interpreter's teardown, where
  Orbax's background threads of a failed save would print pages of tracebacks."""
  code = main()
  sys.stdout.flush()
  sys.stderr.flush()
  if code:
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  run()
