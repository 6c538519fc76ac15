"""`stepaudio` command line: train, print a resolved config, compile ahead of time for a TPU
slice, export/import Hugging Face models, sample from a checkpoint, synthesize and transcribe
speech."""

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

  from stepaudio_jax.tasks.registry import load_config
  from stepaudio_jax.training.trainer import train

  cfg = load_config(args.config, args.overrides, num_devices=jax.device_count(),
                    num_processes=jax.process_count())
  train(cfg)  # writes RUN_DIR/config.yaml once every check has passed
  return 0


def _show_config(args) -> int:
  from stepaudio_jax.config import dump_config
  from stepaudio_jax.tasks.registry import load_config

  dump_config(load_config(args.config, args.overrides), "/dev/stdout")
  return 0


def _shares(args) -> int:
  from stepaudio_jax.data.shares import measure, table
  from stepaudio_jax.tasks.registry import load_config

  cfg = load_config(args.config, args.overrides)
  print(table(measure(cfg, args.steps or cfg.train.steps)))
  return 0


def _compile(args) -> int:
  from stepaudio_jax.tasks.registry import load_config
  from stepaudio_jax.training.aot import compile_train_step, estimate_step_time

  cfg = load_config(args.config, args.overrides)
  report, _ = compile_train_step(cfg, args.topology, args.num_slices)
  print("\n".join(report.describe(args.config)))
  if not report.fits:
    print(f"stepaudio compile: error: {report.overflow()}", file=sys.stderr)
    return 1
  if args.no_estimate:
    return 0
  est = estimate_step_time(cfg, args.topology, args.num_slices, tuple(args.depths))
  print("\n".join(est.describe()))
  return 0


CHECK_TOKENS = [1, 5, 9, 200, 7, 3, 4, 12, 64, 301, 2, 11]  # all below any layout's text block


def _export(args) -> int:
  import jax

  from stepaudio_jax.export.exporter import export_checkpoint

  summary = export_checkpoint(
      args.checkpoint, args.out_dir, model=args.model, dtype=args.dtype,
      max_shard_size=args.max_shard_size,
      tokenizer_model=args.tokenizer, process_index=jax.process_index(),
      process_count=jax.process_count(), overwrite=args.overwrite,
  )
  if jax.process_count() > 1:  # the directory is complete only when every process is done
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("stepaudio export")
  if jax.process_index() == 0:
    print(f"exported step {summary.step}'s {summary.model} as {summary.architecture} to "
          f"{summary.out_dir}: "
          f"{summary.num_tensors} tensors, {summary.total_bytes / 1e6:.1f} MB")
    if args.check:
      from stepaudio_jax.export.parity import check_export

      parity = check_export(args.checkpoint, args.out_dir, args.dtype, CHECK_TOKENS, args.model)
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
  out = score(args.checkpoint, tokens, args.model)
  np.save(args.out, out)
  print(f"wrote {'logits' if out.ndim == 2 else 'scores'} {list(out.shape)} (float32) to "
        f"{args.out}")
  return 0


def _import(args) -> int:
  from stepaudio_jax.export.hf_import import import_hf

  step_dir = import_hf(args.hf_dir, args.checkpoint_dir, config=args.config,
                       overrides=args.overrides, vision_dir=args.vision)
  print(f"imported {args.hf_dir} into {step_dir}")
  return 0


def _generate(args) -> int:
  import json

  from stepaudio_jax.export.generate import generate
  from stepaudio_jax.export.orbax_reader import ExportError

  prompt = args.prompt
  if prompt is None:
    try:
      prompt = [int(t) for t in args.prompt_tokens.split(",") if t.strip()]
    except ValueError:
      raise ExportError(f"--prompt-tokens {args.prompt_tokens!r} must be comma-separated "
                        "integers, e.g. 1,4,17") from None
  gen = generate(args.checkpoint, prompt, args.max_new_tokens, args.temperature, args.top_k,
                 args.top_p, args.no_repeat_ngram, args.dtype, args.seed, args.model)
  if gen.text is not None:
    print(gen.text)
  with open(args.out, "w") as f:
    json.dump(gen.result, f)
  n, prompt_len = len(gen.result["tokens"]), len(gen.result["prompt_tokens"])
  print(f"generated {n} tokens in {gen.seconds:.3f} s: {n / gen.seconds:.1f} tokens/s (prefill "
        f"of {prompt_len} included, compile {gen.compile_seconds:.1f} s not; "
        f"{'truncated' if gen.result['truncated'] else 'stopped at EOS'}) -> {args.out}")
  return 0


def _sweep(args) -> int:
  import shlex

  from stepaudio_jax.experiments.sweep import load_spec, run_sweep

  return run_sweep(load_spec(args.spec), shlex.split(args.launcher), args.dry_run)


def _report(args) -> int:
  from stepaudio_jax.experiments.report import asr_scorable, load_run, write_report

  runs = [load_run(path) for path in args.run_dirs]
  if args.asr_clips:
    from stepaudio_jax.experiments.asr import cached_asr_cer

    for r in runs:
      if asr_scorable(r):
        r.asr = cached_asr_cer(r.path, args.asr_clips)
  content = write_report(runs, args.out)
  print(f"report of {len(runs)} runs -> {os.path.join(args.out, 'report.md')}; plots: "
        f"{', '.join(os.path.join(args.out, p) for p in content['plots']) or 'none'}")
  without = [r["path"] for r in content["runs"] if not r["has_metrics"]]
  if without:
    print(f"no metrics (the run logged no step) in: {', '.join(without)}")
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
  p.add_argument("--model", default="",
                 help="which of the run's models (default: what its task delivers: the LM, a PPO "
                      "run's policy, a reward run's reward model, ...), e.g. critic")
  p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
  p.add_argument("--tokenizer", default="", help="sentencepiece tokenizer.model to ship with it")
  p.add_argument("--overwrite", action="store_true",
                 help="export into a non-empty out_dir, replacing the model files there (weights, "
                      "index, config, tokenizer) and keeping any other file")
  p.add_argument("--check", action="store_true",
                 help="load the export in PyTorch and compare its logits with `stepaudio score` "
                      "(needs the export extra); exit 1 on a mismatch")
  p.set_defaults(fn=_export)

  p = sub.add_parser("score", help="write the model's float32 logits [seq, vocab] (a reward "
                                   "model: scores [seq]) for token ids")
  p.add_argument("checkpoint", help="run directory (newest complete step) or a step directory")
  p.add_argument("--tokens", required=True, help="comma-separated token ids, e.g. 1,5,9")
  p.add_argument("--out", required=True, help="output .npy file")
  p.add_argument("--model", default="",
                 help="which of the run's models (default: what its task delivers: the LM, a PPO "
                      "run's policy, a reward run's reward model, ...), e.g. critic")
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
  p.add_argument("--model", default="",
                 help="which of the run's models (default: what its task delivers: the LM, a PPO "
                      "run's policy, a reward run's reward model, ...), e.g. critic")
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
  p.add_argument("--flow", required=True,
                 help="flow model: its run directory (task: flow) or its export")
  p.add_argument("--vocoder", required=True,
                 help="vocoder: its run directory (task: vocoder) or its export")
  p.add_argument("--out", required=True, help="output .wav")
  p.add_argument("--prompt-wav", default="", help="voice prompt WAV (any rate, mono or stereo)")
  p.add_argument("--prompt-text", default="", help="the voice prompt's transcript")
  p.add_argument("--speaker", default="default", help="speaker name in the LM's system prompt")
  p.add_argument("--max-new-tokens", type=int, default=400)
  p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=50, help="0 = off")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(fn=_synthesize)


def _transcribe(args) -> int:
  import json

  from stepaudio_jax.experiments.transcribe import transcribe

  got = transcribe(args.run_dir, args.audio, args.max_new_tokens)
  for t in got:
    print(f"{t.audio}: {t.text}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump([{"audio": t.audio, "text": t.text} for t in got], f, ensure_ascii=False,
                indent=1)
  return 0


def _add_transcribe_command(sub) -> None:
  p = sub.add_parser("transcribe", help="WAV files -> the run's audio tokenizer -> its LM, "
                                        "greedy -> one `AUDIO: TEXT` line each")
  p.add_argument("run_dir", help="run directory (newest complete step) or a step directory")
  p.add_argument("audio", nargs="+", help="WAV files (any sample rate, mono or stereo)")
  p.add_argument("--out", default="", help="also write [{audio, text}] to this .json")
  p.add_argument("--max-new-tokens", type=int, default=96)
  p.set_defaults(fn=_transcribe)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="stepaudio", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, fn, text in (("train", _train, "train a model from a config"),
                         ("show-config", _show_config, "print the resolved config")):
    p = sub.add_parser(name, help=text)
    p.add_argument("config", help="YAML config file (configs/...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    p.set_defaults(fn=fn)
  p = sub.add_parser("shares", help="the token shares a config's loader delivers per stage, "
                                    "against the configured ones")
  p.add_argument("config", help="YAML config file (configs/...)")
  p.add_argument("--steps", type=int, default=0, help="steps to count (default train.steps)")
  p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=16")
  p.set_defaults(fn=_shares)
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
  _add_transcribe_command(sub)
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
  from stepaudio_jax.inference.speech import SynthesisError
  from stepaudio_jax.training.checkpoint import CheckpointError
  from stepaudio_jax.training.run_lock import RunDirLocked

  # Expected failures: bad input or a broken environment, each explained by its message (the
  # thing and the fix); anything else is a bug and keeps its traceback. FloatingPointError is
  # a diverged run (hooks.check_finite); OSError an I/O failure such as a read-only directory.
  expected = (ConfigError, CheckpointError, ExportError, LaunchError, RecordError, ShardError,
              LoaderStateError, ReportError, SynthesisError, RunDirLocked, FloatingPointError,
              OSError)
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
