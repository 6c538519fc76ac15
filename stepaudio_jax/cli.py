"""`stepaudio` command line: train, print a resolved config, compile ahead of time for a TPU
slice, export/import Hugging Face models, sample from a checkpoint."""

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
DISTRIBUTED_COMMANDS = ("train", "export", "score", "compile", "aot")  # aot = compile


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


def _compile(args) -> int:
  from stepaudio_jax.config import load_config
  from stepaudio_jax.training.aot import compile_train_step, estimate_step_time

  cfg = load_config(args.config, args.overrides)
  report, _ = compile_train_step(cfg, args.topology, args.num_slices)
  gib = 1 << 30
  mesh = " x ".join(f"{k} {v}" for k, v in report.mesh.items())
  print(f"{args.config} on {report.topology}: {report.chips} chips, mesh {mesh}")
  print(f"  HBM per chip      {report.bytes_per_chip / gib:7.2f} GiB of "
        f"{report.hbm_per_chip / gib:.0f} GiB: {'fits' if report.fits else 'DOES NOT FIT'} "
        f"(analytic estimate {report.analytic_bytes_per_chip / gib:.2f} GiB)")
  if not report.fits:
    print(f"stepaudio compile: error: {report.bytes_per_chip / gib:.2f} GiB per chip exceed the "
          f"{report.hbm_per_chip / gib:.0f} GiB of HBM; lower the rows per chip "
          "(train.batch_size / train.grad_accum_steps), remat more (model.remat) or shard more "
          "(mesh.tensor, mesh.sequence)", file=sys.stderr)
    return 1
  if args.no_estimate:
    return 0
  est = estimate_step_time(cfg, args.topology, args.num_slices, tuple(args.depths))
  print(f"  XLA FLOPs/step    {est.xla_flops:.3e} per chip")
  if est.step_flops:  # tasks without an analytic count (flops_per_step 0) get no MFU
    print(f"  model FLOPs/step  {est.step_flops:.3e} (analytic, no remat recompute; XLA counts "
          f"{est.xla_to_model:.2f}x)")
    print(f"  XLA step time     {est.seconds:7.2f} s: {est.mfu:.1%} MFU at "
          f"{est.peak_flops / 1e12:.0f} TFLOP/s per chip, {est.tokens_per_second:,.0f} tokens/s")
    if est.xla_to_model < 1:
      print("  WARNING: XLA counts fewer FLOPs than the model needs, so its cost model misses part "
            "of this program (a loop body counted once, or a kernel's declared cost): this MFU "
            "is too high")
  else:
    print(f"  XLA step time     {est.seconds:7.2f} s (the task reports no model FLOPs: no MFU)")
  if est.loops:
    print(f"  note: {est.loops} while loops remain in the costed program, each body counted once "
          "(the image encoder's layer scan, a task's own scans)")
  print("  (costed with XLA's collective matmuls off: their loop bodies would be counted once)")
  if est.depths:
    print(f"  (XLA's cost analysis counts a scanned layer once: the step was compiled unrolled "
          f"at {est.depths[0]} and {est.depths[1]} layers and extrapolated linearly to "
          f"{est.num_layers}" + (f", one microbatch x {est.microbatches}"
                                 if est.microbatches > 1 else "") + ")")
  return 0


CHECK_TOKENS = [1, 5, 9, 200, 7, 3, 4, 12, 64, 301, 2, 11]  # all below any layout's text block


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
    if args.check:
      from stepaudio_jax.export.parity import check_export

      parity = check_export(args.checkpoint, args.out_dir, args.dtype, CHECK_TOKENS)
      print(f"parity of the {args.dtype} export in PyTorch vs stepaudio score "
            f"({len(CHECK_TOKENS)} tokens, fp32 compute): max |dlogit| "
            f"{parity.max_logit_diff:.2e}, max per-token KL {parity.max_token_kl:.2e}: "
            f"{'ok' if parity.ok else 'MISMATCH'}")
      return 0 if parity.ok else 1
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


def _generate(args) -> int:
  import dataclasses
  import json
  import time

  import jax
  from flax import nnx

  from stepaudio_jax.data.tokenizer import make_tokenizer
  from stepaudio_jax.export.orbax_reader import CheckpointReader, ExportError, load_run_config
  from stepaudio_jax.export.score import load_lm
  from stepaudio_jax.export.step1_layout import LM
  from stepaudio_jax.inference.decode import left_pad
  from stepaudio_jax.inference.sampler import SamplingConfig, make_sampler
  from stepaudio_jax.models.step1 import Step1

  reader = CheckpointReader(args.checkpoint)
  if not any(path[:len(LM)] == LM for path in reader.paths):
    raise ExportError(f"{reader.step_dir} holds no Step1 LM at {'.'.join(LM)} (the pretraining "
                      "task's model); generate samples that LM")
  run_cfg = load_run_config(reader.run_dir)
  ids = run_cfg.tokens
  try:
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                              args.no_repeat_ngram, eos_id=ids.eos_id, pad_id=ids.pad_id)
  except ValueError as e:
    raise ExportError(str(e)) from None
  if args.prompt is not None:  # plain text after bos, not the chat-turn format
    tokenizer = make_tokenizer(run_cfg.data.tokenizer_model, ids)
    prompt = [ids.bos_id, *tokenizer.encode(args.prompt)]
  else:
    try:
      prompt = [int(t) for t in args.prompt_tokens.split(",") if t.strip()]
    except ValueError:
      raise ExportError(f"--prompt-tokens {args.prompt_tokens!r} must be comma-separated "
                        "integers, e.g. 1,4,17") from None
  vocab = run_cfg.model.vocab_size
  bad = [t for t in prompt if not 0 <= t < vocab]
  if not prompt or bad:
    raise ExportError(f"the prompt {'is empty' if not prompt else f'has ids {bad}'}: pass ids "
                      f"in [0, {vocab}), the vocabulary of {reader.run_dir}")

  model = load_lm(reader.step_dir)  # float32 parameters and compute
  params = nnx.to_pure_dict(nnx.state(model))
  if args.dtype == "run":
    cfg = dataclasses.replace(model.cfg, compute_dtype=run_cfg.model.compute_dtype)
    model = nnx.eval_shape(lambda: Step1(cfg, rngs=nnx.Rngs(0)))
  prompts, key = left_pad([prompt], ids.pad_id), jax.random.key(args.seed)
  start = time.perf_counter()
  sample = make_sampler(model).lower(params, prompts, sampling, key).compile()
  compile_s, start = time.perf_counter() - start, time.perf_counter()
  out = jax.device_get(sample(params, prompts, key))
  seconds = time.perf_counter() - start
  n = int(out.lengths[0])
  result = {
      "checkpoint": reader.step_dir, "step": reader.step, "prompt_tokens": prompt,
      "tokens": out.tokens[0, :n].tolist(), "logprobs": out.logprobs[0, :n].tolist(),
      "truncated": bool(out.truncated[0]), "compute_dtype": model.cfg.compute_dtype.value,
      **dataclasses.asdict(sampling), "seed": args.seed,
  }
  if args.prompt is not None:  # ids outside the text vocabulary (audio codes, EOS) are left out
    new = [t for t in result["tokens"] if t != ids.eos_id]
    result["text"] = tokenizer.decode(new)
    print(tokenizer.decode(prompt[1:] + new))  # whole, so the pieces' spaces survive
  with open(args.out, "w") as f:
    json.dump(result, f)
  print(f"generated {n} tokens in {seconds:.3f} s: {n / seconds:.1f} tokens/s (prefill of "
        f"{len(prompt)} included, compile {compile_s:.1f} s not; "
        f"{'truncated' if result['truncated'] else 'stopped at EOS'}) -> {args.out}")
  return 0


def _sweep(args) -> int:
  import shlex

  from stepaudio_jax.experiments.sweep import load_spec, run_sweep

  return run_sweep(load_spec(args.spec), shlex.split(args.launcher), args.dry_run)


def _report(args) -> int:
  from stepaudio_jax.experiments.report import load_run, write_report

  runs = [load_run(path) for path in args.run_dirs]
  if args.asr_clips:
    from stepaudio_jax.experiments.asr import cached_asr_cer

    for r in runs:
      if r.task in ("pretrain", "sft") and r.config.get("data.eval_shards.asr") and \
          os.path.isdir(os.path.join(r.path, "checkpoints")):
        r.asr = cached_asr_cer(r.path, args.asr_clips)
  content = write_report(runs, args.out)
  print(f"report of {len(runs)} runs -> {os.path.join(args.out, 'report.md')}; plots: "
        f"{', '.join(os.path.join(args.out, p) for p in content['plots']) or 'none'}")
  return 0


def _add_experiment_commands(sub) -> None:
  p = sub.add_parser("sweep", help="train every variant of a sweep spec, each in its own run "
                                   "directory; rerun to resume (finished variants are skipped)")
  p.add_argument("spec", help="sweep spec YAML (configs/ablations/*.sweep.yaml)")
  p.add_argument("--dry-run", action="store_true", help="print each variant's command only")
  p.add_argument("--launcher", default="",
                 help="run each variant through this command instead of `stepaudio train`, "
                      "e.g. \"sbatch launch/slurm_gpu.sbatch\" (it gets CONFIG key=value ...)")
  p.set_defaults(fn=_sweep)
  p = sub.add_parser("report", help="compare runs: a markdown table, report.json and PNG plots")
  p.add_argument("run_dirs", nargs="+", help="run directories (train.run_dir of each run)")
  p.add_argument("--out", required=True, help="directory for report.md, report.json, plots")
  p.add_argument("--asr-clips", type=int, default=0,
                 help="also score ASR: greedy transcripts of this many held-out clips per "
                      "pretraining or SFT run, CER by jiwer (0 = off)")
  p.set_defaults(fn=_report)


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
  p.add_argument("--check", action="store_true",
                 help="load the export in PyTorch and compare its logits with `stepaudio score` "
                      "(needs the export extra); exit 1 on a mismatch")
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


def _add_generate_command(sub) -> None:
  p = sub.add_parser("generate", help="sample tokens from a checkpoint's LM; write them as JSON")
  p.add_argument("checkpoint", help="run directory (newest complete step) or a step directory")
  prompt = p.add_mutually_exclusive_group(required=True)
  prompt.add_argument("--prompt-tokens", help="comma-separated prompt ids, e.g. 1,4,17")
  prompt.add_argument("--prompt", help="prompt text: bos, then the run's tokenizer's ids")
  p.add_argument("--max-new-tokens", type=int, default=32)
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep; 1 = off")
  p.add_argument("--no-repeat-ngram", type=int, default=0,
                 help="never repeat an n-gram of the output; 0 = off")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", choices=("float32", "run"), default="float32",
                 help="compute dtype: float32, or the run's model.compute_dtype")
  p.add_argument("--out", required=True, help="output .json: tokens, logprobs, truncated, text")
  p.set_defaults(fn=_generate)


def _synthesize(args) -> int:
  from stepaudio_jax.experiments.synthesize import synthesize

  synthesize(args.lm, args.flow, args.vocoder, args.text, args.out, args.prompt_wav,
             args.prompt_text, args.speaker, args.max_new_tokens, args.temperature, args.top_k,
             args.seed)
  return 0


def _add_synthesize_command(sub) -> None:
  p = sub.add_parser("synthesize", help="text -> TTS LM -> codes -> flow -> vocoder -> WAV")
  p.add_argument("text", help='what to say, with optional leading tags: "(English)(slow 1) hi"')
  p.add_argument("--lm", required=True, help="run directory of the TTS LM (task: sft)")
  p.add_argument("--flow", required=True, help="run directory of the flow model (task: flow)")
  p.add_argument("--vocoder", required=True, help="run directory of the vocoder (task: vocoder)")
  p.add_argument("--out", required=True, help="output .wav")
  p.add_argument("--prompt-wav", default="", help="voice prompt WAV (any rate, mono or stereo)")
  p.add_argument("--prompt-text", default="", help="the voice prompt's transcript")
  p.add_argument("--speaker", default="default", help="speaker name in the LM's system prompt")
  p.add_argument("--max-new-tokens", type=int, default=400)
  p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=50, help="0 = off")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(fn=_synthesize)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="stepaudio", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, fn, text in (("train", _train, "train a model from a config"),
                         ("show-config", _show_config, "print the resolved config")):
    p = sub.add_parser(name, help=text)
    p.add_argument("config", help="YAML config file (configs/...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    p.set_defaults(fn=fn)
  p = sub.add_parser("compile", aliases=["aot"],
                     help="compile the train step for a TPU slice here; report memory, time, MFU")
  p.add_argument("config", help="YAML config file (configs/...)")
  p.add_argument("--topology", default="v5p:8x8x8", help="TPU slice, e.g. v5p:8x8x8")
  p.add_argument("--num-slices", type=int, default=1)
  p.add_argument("--depths", type=int, nargs=2, default=[1, 2], metavar=("LO", "HI"),
                 help="layer counts of the unrolled compiles the time estimate extrapolates from")
  p.add_argument("--no-estimate", action="store_true", help="memory only: skip the time estimate")
  p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=512")
  p.set_defaults(fn=_compile)
  _add_export_commands(sub)
  _add_generate_command(sub)
  _add_experiment_commands(sub)
  _add_synthesize_command(sub)
  for p in dict.fromkeys(sub.choices[name] for name in DISTRIBUTED_COMMANDS):  # aliases share one
    add_flags(p)
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
  from stepaudio_jax.experiments.report import ReportError
  from stepaudio_jax.export.orbax_reader import ExportError
  from stepaudio_jax.training.checkpoint import CheckpointError

  # Expected failures: bad input or a broken environment, each explained by its message (the
  # thing and the fix); anything else is a bug and keeps its traceback. FloatingPointError is
  # a diverged run (hooks.check_finite); OSError an I/O failure such as a read-only directory.
  expected = (ConfigError, CheckpointError, ExportError, LaunchError, RecordError, ShardError,
              LoaderStateError, ReportError, FloatingPointError, OSError)
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
