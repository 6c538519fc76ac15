"""`stepaudio generate` on a tiny trained run: the JSON equals the jitted sampler's output for
the same seed, --prompt uses the run's tokenizer, and bad input is one error line (exit 2)."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from stepaudio_jax import cli
from stepaudio_jax.config import dump_config
from stepaudio_jax.data.tokenizer import BYTE_OFFSET
from stepaudio_jax.export.score import load_lm
from stepaudio_jax.inference.decode import left_pad
from stepaudio_jax.inference.sampler import SamplingConfig, make_sampler
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.trainer import train
from tests.conftest import REPO

TINY = os.path.join(REPO, "configs", "tiny.yaml")
VOCODER = os.path.join(REPO, "configs", "speech", "vocoder_tiny.yaml")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  run = str(tmp_path_factory.mktemp("generate") / "run")
  train(load_config(os.path.join(REPO, "configs/tiny.yaml"),
                    [f"train.run_dir={run}", "train.steps=2", "train.seq_len=64"]),
        print_fn=lambda *a, **k: None)
  return run


def _direct(run: str, prompt: list[int], cfg: SamplingConfig, seed: int):
  """The jitted sampler called here on the run's float32 LM, as host arrays."""
  model = load_lm(run)
  out = make_sampler(model)(nnx.to_pure_dict(nnx.state(model)), left_pad([prompt]), cfg,
                            jax.random.key(seed))
  return jax.tree.map(np.asarray, out)


def test_generate_tokens_match_the_sampler(run_dir, tmp_path):
  """In a one-device subprocess, as a script would run it."""
  out = str(tmp_path / "out.json")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "stepaudio_jax.cli", "generate", run_dir, "--prompt-tokens",
       "1,4,17", "--max-new-tokens", "32", "--temperature", "0.8", "--top-p", "0.95",
       "--seed", "7", "--out", out],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("tokens/s") == 1
  with open(out) as f:
    got = json.load(f)
  want = _direct(run_dir, [1, 4, 17], SamplingConfig(32, 0.8, top_p=0.95), seed=7)
  n = int(want.lengths[0])
  assert got["prompt_tokens"] == [1, 4, 17] and got["step"] == 2
  assert got["tokens"] == want.tokens[0, :n].tolist()
  np.testing.assert_allclose(got["logprobs"], want.logprobs[0, :n], atol=1e-6)
  assert got["truncated"] == bool(want.truncated[0])


def test_generate_prompt_text_uses_the_run_tokenizer(run_dir, tmp_path, capsys):
  """tiny.yaml has no sentencepiece model: bos, then the byte tokenizer's ids; greedy, from
  a step directory."""
  out = str(tmp_path / "out.json")
  step_dir = os.path.join(run_dir, "checkpoints", "2")
  assert cli.main(["generate", step_dir, "--prompt", "hi", "--max-new-tokens", "8",
                   "--temperature", "0", "--out", out]) == 0
  with open(out) as f:
    got = json.load(f)
  assert got["step"] == 2
  assert got["prompt_tokens"] == [1, BYTE_OFFSET + ord("h"), BYTE_OFFSET + ord("i")]
  want = _direct(run_dir, got["prompt_tokens"], SamplingConfig(8, temperature=0.0), seed=0)
  assert got["tokens"] == want.tokens[0, :int(want.lengths[0])].tolist()
  text = bytes(t - BYTE_OFFSET for t in got["tokens"] if BYTE_OFFSET <= t < BYTE_OFFSET + 256)
  assert got["text"] == text.decode("utf-8", "replace")
  assert "tokens/s" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--prompt-tokens", "1,4,9999"], r"has ids \[9999\]: pass ids in \[0, 512\)"),
    (["--prompt-tokens", "1,x"], "must be comma-separated integers"),
    (["--prompt-tokens", "1", "--top-p", "0"], r"top_p=0.0 must be in \(0, 1\]"),
    (["--prompt-tokens", ",".join(["5"] * 500), "--max-new-tokens", "32"],
     r"the prompt \(500 ids\) and --max-new-tokens 32 exceed the model's max_seq_len 512"),
])
def test_generate_bad_input_is_one_error_line(run_dir, tmp_path, capsys, args, message):
  code = cli.main(["generate", run_dir, *args, "--out", str(tmp_path / "o.json")])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("stepaudio generate: error: ") and err.count("\n") == 1
  assert re.search(message, err), err


def test_generate_needs_a_checkpoint_with_an_lm(tmp_path, capsys):
  missing = str(tmp_path / "nowhere")
  assert cli.main(["generate", missing, "--prompt-tokens", "1", "--out", "o.json"]) == 2
  assert "is neither a run directory" in capsys.readouterr().err
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "run" / "checkpoints" / "3" / "state",
                    {"params": {"critic": {"w": jnp.ones(2)}}})
  checkpointer.wait_until_finished()
  dump_config(load_config(TINY), str(tmp_path / "run" / "config.yaml"))
  assert cli.main(["generate", str(tmp_path / "run"), "--prompt-tokens", "1", "--out",
                   "o.json"]) == 2
  assert "holds no arrays of model 'lm' (at model.lm)" in capsys.readouterr().err
  dump_config(load_config(VOCODER), str(tmp_path / "run" / "config.yaml"))
  assert cli.main(["generate", str(tmp_path / "run"), "--prompt-tokens", "1", "--out",
                   "o.json"]) == 2
  assert "model 'generator' of this vocoder run is a vocoder model, not a step1 model" in \
      capsys.readouterr().err
  assert cli.main(["generate", str(tmp_path / "run"), "--model", "critic", "--prompt-tokens",
                   "1", "--out", "o.json"]) == 2
  assert "holds no model 'critic'; its models: generator" in capsys.readouterr().err
