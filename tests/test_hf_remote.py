"""An exported Step1 loads as the public Step-Audio checkpoints do, with
AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True): every weight strictly, logits
equal to `stepaudio score`, and generate() on its KV cache gives `stepaudio generate`'s greedy
tokens (stopping at EOS, left-padded batches, and without the cache alike)."""

import ast
import json
import os
import shutil

import numpy as np
import pytest
import setuptools

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stepaudio_jax import cli  # noqa: E402
from stepaudio_jax.config import dump_config  # noqa: E402
from stepaudio_jax.config.model import PositionEncoding, Step1Config, TokenLayout  # noqa: E402
from stepaudio_jax.export import hf_remote, step1_layout  # noqa: E402
from stepaudio_jax.export.exporter import export_checkpoint  # noqa: E402
from stepaudio_jax.export.score import score  # noqa: E402
from stepaudio_jax.tasks.registry import load_config  # noqa: E402
from stepaudio_jax.training.trainer import train  # noqa: E402
from tests.conftest import REPO  # noqa: E402

TINY = os.path.join(REPO, "configs", "tiny.yaml")
RUN = ["train.steps=1", "train.batch_size=8", "train.seq_len=32", "checkpoint.every=1",
       "model.init_std=0.1"]
PROMPT = [1, 5, 9, 200, 7, 30, 400, 12, 64, 301, 2, 11]
SHORT = [1, 44, 310, 6, 250]  # left-padded beside PROMPT
NEW = 12


def _train(run_dir: str, *extra: str) -> str:
  cfg = load_config(TINY, RUN + [f"train.run_dir={run_dir}", *extra])
  os.makedirs(run_dir, exist_ok=True)
  dump_config(cfg, os.path.join(run_dir, "config.yaml"))
  train(cfg, print_fn=lambda *a, **k: None)
  return run_dir


def _load(out_dir: str):
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      out_dir, trust_remote_code=True, output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched keys, no errors
  return model.eval()


def _stepaudio_greedy(run_dir: str, prompt: list[int], out: str) -> dict:
  """`stepaudio generate --temperature 0`: its new tokens (EOS included) and their logprobs."""
  assert cli.main(["generate", run_dir, "--prompt-tokens", ",".join(map(str, prompt)),
                   "--temperature", "0", "--max-new-tokens", str(NEW), "--out", out]) == 0
  with open(out) as f:
    result = json.load(f)
  return {"tokens": result["tokens"], "logprobs": result["logprobs"]}


def _generate(model, prompts: list[list[int]], **kwargs) -> list[dict]:
  """Greedy generate() on left-padded prompts: each row's new tokens up to its EOS and their
  logprobs (log_softmax of the logits generate chose them from). The logprobs see what the
  tokens may not: position and padding bugs the tiny model's argmax happens to survive."""
  pad_id, length = model.generation_config.pad_token_id, max(map(len, prompts))
  ids = torch.tensor([[pad_id] * (length - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, **kwargs)
  new_BN = out.sequences[:, length:]
  logprobs_BNV = torch.stack(out.logits, dim=1).float().log_softmax(-1)
  chosen_BN = logprobs_BNV.gather(-1, new_BN[..., None])[..., 0]
  eos, rows = model.generation_config.eos_token_id, []
  for row, logprobs in zip(new_BN.tolist(), chosen_BN.tolist()):
    n = row.index(eos) + 1 if eos in row else len(row)
    rows.append({"tokens": row[:n], "logprobs": logprobs[:n]})
  return rows


def _assert_same(got: list[dict], want: list[dict]) -> None:
  assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
  for g, w in zip(got, want):
    np.testing.assert_allclose(g["logprobs"], w["logprobs"], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return _train(str(tmp_path_factory.mktemp("hf_remote") / "run"))


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("hf_remote") / "hf")
  export_checkpoint(run_dir, out, dtype="float32")
  return out


@pytest.fixture(scope="module")
def model(exported):
  return _load(exported)


@pytest.fixture(scope="module")
def greedy(run_dir, tmp_path_factory):
  """`stepaudio generate --temperature 0` of PROMPT and SHORT."""
  tmp = tmp_path_factory.mktemp("greedy")
  return {tuple(p): _stepaudio_greedy(run_dir, p, str(tmp / f"{i}.json"))
          for i, p in enumerate((PROMPT, SHORT))}


def test_export_ships_the_remote_code(exported):
  cfg = json.load(open(os.path.join(exported, "config.json")))
  assert cfg["auto_map"] == {"AutoConfig": "configuration_step1.Step1Config",
                             "AutoModelForCausalLM": "modeling_step1.Step1ForCausalLM"}
  for name in hf_remote.FILES:
    assert os.path.isfile(os.path.join(exported, name)), name
  rope = step1_layout.hf_config(Step1Config(position_encoding=PositionEncoding.ROPE),
                                TokenLayout(), "float32")
  assert "auto_map" not in rope  # plain llama: transformers' own code
  # They run without this package, beside the weights: torch and transformers only.
  here = os.path.dirname(hf_remote.__file__)
  for name in hf_remote.FILES:
    with open(os.path.join(here, name)) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        tops = {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        tops = {"." + node.module} if node.level else {node.module.split(".")[0]}
      else:
        continue
      assert tops <= {"math", "torch", "transformers", ".configuration_step1"}, (name, tops)
  # `packages = find:` puts them in the wheel (hf_remote is a package).
  assert "stepaudio_jax.export.hf_remote" in setuptools.find_packages(REPO,
                                                                      include=["stepaudio_jax*"])


def test_overwrite_replaces_the_remote_code(run_dir, tmp_path):
  out = str(tmp_path / "hf")
  export_checkpoint(run_dir, out, dtype="float32")
  with open(os.path.join(out, "modeling_step1.py"), "a") as f:
    f.write("stale = True\n")
  export_checkpoint(run_dir, out, dtype="float32", overwrite=True)
  with open(os.path.join(out, "modeling_step1.py")) as f:
    assert "stale" not in f.read()


def test_logits_equal_stepaudio_score(run_dir, model):
  with torch.no_grad():
    theirs = model(torch.tensor([PROMPT])).logits[0].numpy()
  ours = score(run_dir, PROMPT)
  assert ours.std() > 0.1  # a distribution with something to lose
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_cached_decoding_equals_recomputation(model):
  """Prefill a left-padded batch, then feed the rest one token at a time through the cache:
  the logits of real positions equal one forward of the whole batch."""
  rows = [PROMPT, SHORT + [17, 90, 3, 8]]
  length = max(map(len, rows))
  ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
  mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
  with torch.no_grad():
    full = model(ids, attention_mask=mask).logits
    split = length - 4
    out = model(ids[:, :split], attention_mask=mask[:, :split], use_cache=True)
    steps = [out.logits]
    for i in range(split, length):
      out = model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], cache=out.cache,
                  use_cache=True)
      steps.append(out.logits)
  cached = torch.cat(steps, dim=1)
  real = mask.bool()
  torch.testing.assert_close(cached[real], full[real], atol=1e-5, rtol=0)


def test_generate_equals_stepaudio_generate(model, greedy):
  want = greedy[tuple(PROMPT)]
  tokens = want["tokens"]
  assert len(tokens) == NEW and len(set(tokens)) > 3  # no EOS here; a continuation that moves
  _assert_same(_generate(model, [PROMPT]), [want])
  _assert_same(_generate(model, [PROMPT], use_cache=False), [want])


def test_left_padded_batch_generates_each_row_alone(model, greedy):
  want = [greedy[tuple(PROMPT)], greedy[tuple(SHORT)]]
  _assert_same(_generate(model, [PROMPT, SHORT]), want)
  _assert_same(_generate(model, [PROMPT, SHORT], use_cache=False), want)


def test_generate_stops_at_eos_like_stepaudio(run_dir, greedy, tmp_path):
  """The run again with eos_id set to a token its greedy continuation emits midway: both
  samplers stop right after it (generation_config.json carries the new id)."""
  tokens, config = greedy[tuple(PROMPT)]["tokens"], os.path.join(run_dir, "config.yaml")
  text_vocab = load_config(config).tokens.text_vocab_size  # special ids live below it
  eos = next(t for i, t in enumerate(tokens)
             if i >= 2 and t not in tokens[:i] and 4 < t < text_vocab)
  run2 = str(tmp_path / "run")
  shutil.copytree(run_dir, run2)
  cfg = load_config(config, [f"train.run_dir={run2}", f"tokens.eos_id={eos}"])
  dump_config(cfg, os.path.join(run2, "config.yaml"))
  out = str(tmp_path / "hf")
  export_checkpoint(run2, out, dtype="float32")
  want = _stepaudio_greedy(run2, PROMPT, str(tmp_path / "g.json"))
  assert want["tokens"] == tokens[:tokens.index(eos) + 1]
  model = _load(out)
  assert model.generation_config.eos_token_id == eos
  with torch.no_grad():
    alone = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False)
  assert alone[0, len(PROMPT):].tolist() == want["tokens"]  # stopped there
  _assert_same(_generate(model, [PROMPT, SHORT])[:1], [want])  # and as a batch's row
