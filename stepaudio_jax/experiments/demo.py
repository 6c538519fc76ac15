"""`make demo`: the whole pipeline on the committed corpus, as a user runs it, in one command.

Each phase is the `stepaudio` command a user would type (a subprocess, so nothing is shared
but files): pretraining stages 1-3 in one run, TTS SFT and AQTA SFT from it, the two-stage
reward model from the AQTA model, a short PPO, an export checked against PyTorch, one generated
answer, short flow-matching and vocoder runs with one WAV synthesised from text through the TTS
model, and a report over the runs. It ends with a table of phase, steps, time and final metrics
and the paths of the plots. `--fast` is the one-minute taste: the synthetic tiny config and its
report.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from stepaudio_jax.experiments.report import HEADLINE, load_run, write_report

STEPAUDIO = [sys.executable, "-m", "stepaudio_jax.cli"]
PROMPT = "three plus four is"
SPEECH = "(English) three plus four is seven."


def _phases(out: str, fast: bool) -> list[tuple[str, list[str], str | None]]:
  """(phase, stepaudio arguments, run directory or None)."""
  def run(name):
    return os.path.join(out, name)

  if fast:
    return [("pretrain (synthetic)", ["train", "configs/demo.yaml",
                                      f"train.run_dir={run('pretrain')}"], run("pretrain"))]
  return [
      ("pretrain stages 1-3", ["train", "configs/corpus.yaml", f"train.run_dir={run('pretrain')}"],
       run("pretrain")),
      ("TTS SFT", ["train", "configs/sft/corpus_tts.yaml", f"train.run_dir={run('sft-tts')}",
                   f"checkpoint.init_from={run('pretrain')}"], run("sft-tts")),
      ("AQTA SFT", ["train", "configs/sft/corpus_aqta.yaml", f"train.run_dir={run('sft-aqta')}",
                    f"checkpoint.init_from={run('pretrain')}"], run("sft-aqta")),
      ("reward model", ["train", "configs/reward/corpus.yaml", f"train.run_dir={run('reward')}",
                        f"checkpoint.init_from={run('sft-aqta')}"], run("reward")),
      ("PPO", ["train", "configs/ppo/corpus.yaml", f"train.run_dir={run('ppo')}",
               f"ppo.policy_from={run('sft-aqta')}", f"ppo.reward_from={run('reward')}"],
       run("ppo")),
      ("export + PyTorch check", ["export", run("pretrain"), run("export"), "--dtype", "float32",
                                  "--check"], None),
      ("generate", ["generate", run("sft-aqta"), "--prompt", PROMPT, "--temperature", "0",
                    "--max-new-tokens", "16", "--out", run("generate.json")], None),
      ("flow matching (codes -> mel)", ["train", "configs/speech/flow_tiny.yaml",
                                        f"train.run_dir={run('flow')}", "train.steps=100"],
       run("flow")),
      ("vocoder (mel -> wave)", ["train", "configs/speech/vocoder_tiny.yaml",
                                 f"train.run_dir={run('vocoder')}", "train.steps=100"],
       run("vocoder")),
      ("synthesize", ["synthesize", SPEECH, "--lm", run("sft-tts"), "--flow", run("flow"),
                      "--vocoder", run("vocoder"), "--out", run("demo.wav")], None),
  ]


def _metrics(run_dir: str) -> str:
  run = load_run(run_dir)
  s = run.summary()
  keys = [f"train/{k}" for k in HEADLINE.get(run.task, ("loss",))]
  keys += [k for k in ("eval/loss", "eval/accuracy", "eval/mel_l1") if k in s]
  return ", ".join(f"{k} {s[k]:.4g}" for k in keys if k in s)


def _stream(cmd: list[str]) -> tuple[int, list[str]]:
  """Runs cmd with its output shown as it comes; returns the exit code and the lines."""
  child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in child.stdout:
    print(line, end="", flush=True)
    lines.append(line.rstrip("\n"))
  return child.wait(), lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/demo", help="directory of every phase's run")
  parser.add_argument("--fast", action="store_true", help="the one-minute synthetic taste")
  args = parser.parse_args(argv)
  shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out)
  rows, runs, begin = [], [], time.perf_counter()
  for phase, cli_args, run_dir in _phases(args.out, args.fast):
    print(f"\n== {phase}: stepaudio {' '.join(cli_args)}", flush=True)
    start = time.perf_counter()
    code, lines = _stream(STEPAUDIO + cli_args)
    seconds = time.perf_counter() - start
    if code:
      print(f"demo: {phase} failed (exit {code}); the command is above", file=sys.stderr)
      return code
    if run_dir is not None:
      runs.append(run_dir)
      steps = json.load(open(os.path.join(run_dir, "done.json")))["step"]
      rows.append((phase, str(steps), seconds, _metrics(run_dir)))
    elif cli_args[0] == "synthesize":
      rows.append((phase, "-", seconds, f"{SPEECH!r} -> {cli_args[-1]}"))
    elif cli_args[0] == "generate":
      text = json.load(open(cli_args[-1])).get("text", "")
      rows.append((phase, "-", seconds, f"{PROMPT!r} -> {text!r}"))
    else:
      parity = [ln for ln in lines if ln.startswith("parity")]
      rows.append((phase, "-", seconds, parity[-1] if parity else ""))
  report_dir = os.path.join(args.out, "report")
  content = write_report([load_run(r) for r in runs], report_dir)
  total = time.perf_counter() - begin
  print("\n| phase | steps | time | final metrics |\n|---|---|---|---|")
  for phase, steps, seconds, metrics in rows:
    print(f"| {phase} | {steps} | {seconds:.0f} s | {metrics.replace('|', chr(92) + '|')} |")
  print(f"\ndemo done in {total / 60:.1f} min; report {os.path.join(report_dir, 'report.md')}; "
        f"plots: {', '.join(os.path.join(report_dir, p) for p in content['plots'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
