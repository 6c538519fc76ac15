"""The README's command blocks run as written, and every relative link in the docs resolves.

Each ```bash block of README.md is split into commands (backslash continuations joined,
comments dropped by shlex); every command is either run here or listed in SKIPPED with the
reason. The fast test runs the cheap ones with the README's arguments, in this process: the
launch dry runs, the sweep's dry run and the share count (about 10 s). The slow one (about
3 min) runs the phase blocks in their order, as `make demo` does, into a
temporary directory in place of runs/demo, with the tiny overrides of TINY appended to the
commands that train (argparse and the config loader let the last value win), then the Python
loading snippets on the exports those commands wrote.
"""

import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

from stepaudio_jax import cli
from tests.conftest import REPO

README = os.path.join(REPO, "README.md")
BIN = os.path.dirname(sys.executable)

SKIPPED = {
    "make demo": "the demo itself (minutes); tests/test_demo.py runs its fast form",
    "make test": "the test suite, which holds this test",
    "stepaudio sweep configs/ablations/codebooks.sweep.yaml":
        "9 runs of 240 steps; tests/test_sweep.py runs and resumes a 2-variant sweep",
    "stepaudio report runs/ablations/codebooks/* --out runs/ablations/codebooks-report "
    "--asr-clips 104": "reads the 9 runs of that sweep; tests/test_report.py checks the report",
    "stepaudio compile configs/step_omni_130b_v5p.yaml --topology v5p:8x8x8":
        "the 130B step, minutes per compile; tests/test_compile.py pins its shardings",
}
# Appended to every training command, then by its config (or subcommand): a couple of steps each.
FAST_TRAIN = ["train.eval_every=0", "train.peak_flops_per_device=1e12"]
STEPS = ["train.steps=2"]
_PAIRS = os.path.join(REPO, "data_pipelines", "corpus", "preference")
_REWARD_STAGES = ",".join(
    f"{{shards: [{_PAIRS}/{name}/train-*.array_record], "
    f"eval_shards: [{_PAIRS}/{name}/eval-*.array_record], epochs: 0.02}}"
    for name in ("tqta", "aqta"))
TINY = {
    "configs/sft/corpus_tts.yaml": ["train.epochs=0", *STEPS],
    "configs/sft/corpus_aqta.yaml": ["train.epochs=0", *STEPS],
    # A stage's epochs set a reward run's length (a train.steps is refused); PPO needs the
    # held-out eval of its last step.
    "configs/reward/corpus.yaml": [f"reward.stages=[{_REWARD_STAGES}]", "train.eval_every=1000",
                                   "train.eval_batches=2"],
    "configs/ppo/corpus.yaml": [*STEPS, "ppo.critic_warmup_steps=1"],
    # A 2-step TTS LM rarely says a whole code group greedily: sample it.
    "synthesize": ["--temperature", "1", "--top-k", "0", "--max-new-tokens", "40"],
}


def blocks(kind: str) -> list[str]:
  with open(README) as f:
    return re.findall(rf"^```{kind}\n(.*?)^```", f.read(), re.S | re.M)


def commands(block: str) -> list[list[str]]:
  text = re.sub(r"\\\n\s*", " ", block)
  return [words for line in text.splitlines() if (words := shlex.split(line, comments=True))]


def readme_commands() -> list[list[str]]:
  return [c for b in blocks("bash") for c in commands(b)]


def is_fast(words: list[str]) -> bool:
  if words[:2] == ["python", "launch/submit.py"]:
    return "--dry-run" in words
  return words[:2] == ["stepaudio", "shares"] or (words[:2] == ["stepaudio", "sweep"]
                                                  and "--dry-run" in words)


def is_skipped(words: list[str]) -> bool:
  return " ".join(words) in SKIPPED


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  return env


def run(words: list[str], runs: str = "", extra: list[str] = (), timeout: int = 900) -> str:
  """words as the README has them, runs/demo moved to `runs`, `extra` appended; the output."""
  argv = [a.replace("runs/demo", runs) if runs else a for a in words] + list(extra)
  if argv[0] == "stepaudio":
    argv[0] = os.path.join(BIN, "stepaudio")
  elif argv[0] == "python":
    argv[0] = sys.executable
  done = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=timeout)
  assert done.returncode == 0, f"{' '.join(words)}: exit {done.returncode}\n" \
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
  return done.stdout


def tiny(words: list[str]) -> list[str]:
  if words[1] == "train":
    return FAST_TRAIN + TINY.get(words[2], STEPS)
  return TINY.get(words[1], [])


def test_every_readme_command_is_run_or_skipped_with_a_reason():
  found = readme_commands()
  assert found, "no ```bash blocks in README.md"
  for words in found:
    assert is_fast(words) or is_skipped(words) or words[0] == "stepaudio", words
  listed = {" ".join(w) for w in found}
  stale = [c for c in SKIPPED if c not in listed]
  assert not stale, f"SKIPPED names commands the README no longer has: {stale}"


def test_readme_fits_its_page_limit():
  with open(README) as f:
    assert len(f.read().splitlines()) <= 400


def test_the_cheap_readme_commands_run_verbatim(capsys, monkeypatch):
  """In this process (one JAX import for all): launch/submit.py's and the CLI's main with the
  README's arguments."""
  spec = importlib.util.spec_from_file_location("submit", os.path.join(REPO, "launch",
                                                                       "submit.py"))
  submit = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(submit)
  monkeypatch.chdir(REPO)
  fast = [w for w in readme_commands() if is_fast(w)]
  assert len(fast) >= 6  # four launch targets, the sweep's dry run, the shares
  for words in fast:
    main = submit.main if words[0] == "python" else cli.main
    code = main(words[2:] if words[0] == "python" else words[1:])
    out = capsys.readouterr().out
    assert code == 0, f"{' '.join(words)}: exit {code}\n{out[-3000:]}"
    want = {"python": "configs/model/step1-130b.yaml", "shares": "stage 3 (",
            "sweep": "train.run_dir=runs/ablations/codebooks/"}[words[0] if words[0] == "python"
                                                               else words[1]]
    assert want in out, out


@pytest.mark.slow
def test_the_readme_phases_run_in_order(tmp_path):
  runs = str(tmp_path / "demo")
  phases = [w for w in readme_commands() if not is_fast(w) and not is_skipped(w)]
  assert [w[1] for w in phases] == ["train", "train", "train", "train", "train", "export",
                                    "export", "generate", "train", "train", "synthesize",
                                    "train", "report", "transcribe", "report", "compile"], phases
  for words in phases:
    run(words, runs, tiny(words))
  assert os.path.getsize(os.path.join(runs, "demo.wav")) > 44
  assert os.path.isfile(os.path.join(runs, "report", "report.md"))
  snippets = blocks("python")
  assert len(snippets) == 2  # the policy in transformers, the reward model in torch
  for snippet, last in zip(snippets, ("out", "scores")):
    code = snippet.replace("runs/demo", runs) + f"\nprint(tuple({last}.shape))\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith("(1, "), done.stdout


def _links(path: str) -> list[str]:
  with open(path) as f:
    text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # code is not a link
  return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", [README, *sorted(glob.glob(os.path.join(REPO, "docs", "**",
                                                                        "*.md"),
                                                          recursive=True))],
                         ids=lambda p: os.path.relpath(p, REPO))
def test_every_relative_link_names_a_file_that_exists(page):
  missing = []
  for target in _links(page):
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
      continue
    path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
    if not os.path.exists(path):
      missing.append(target)
  assert not missing, f"{os.path.relpath(page, REPO)} links to missing files: {missing}"
