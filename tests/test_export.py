"""Export to the public layouts: parity with PyTorch, layout, dtypes, round trip, import errors."""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stepaudio_jax import cli  # noqa: E402
from stepaudio_jax.config import dump_config  # noqa: E402
from stepaudio_jax.export.exporter import export_checkpoint  # noqa: E402
from stepaudio_jax.export.hf_import import import_hf  # noqa: E402
from stepaudio_jax.export.orbax_reader import CheckpointReader, ExportError  # noqa: E402
from stepaudio_jax.export.safetensors_io import SafetensorsDir, TensorPlan, write_file  # noqa: E402
from stepaudio_jax.export.score import score  # noqa: E402
from stepaudio_jax.export.torch_step1 import Step1ForCausalLM  # noqa: E402
from stepaudio_jax.tasks.registry import load_config  # noqa: E402
from stepaudio_jax.training.trainer import train  # noqa: E402
from tests.conftest import REPO  # noqa: E402

TINY = os.path.join(REPO, "configs", "tiny.yaml")
RUN = ["train.steps=1", "train.batch_size=8", "train.seq_len=32", "checkpoint.every=1",
       "model.init_std=0.1"]
TOKENS = [1, 5, 9, 200, 7, 3, 400, 12, 64, 301, 2, 11]


def _train(run_dir: str, *extra: str) -> str:
  cfg = load_config(TINY, RUN + [f"train.run_dir={run_dir}", *extra])
  os.makedirs(run_dir, exist_ok=True)
  dump_config(cfg, os.path.join(run_dir, "config.yaml"))
  train(cfg, print_fn=lambda *a, **k: None)
  return run_dir


@pytest.fixture(scope="module")
def alibi_run(tmp_path_factory):
  return _train(str(tmp_path_factory.mktemp("alibi") / "run"))


@pytest.fixture(scope="module")
def rope_run(tmp_path_factory):
  return _train(str(tmp_path_factory.mktemp("rope") / "run"), "model.position_encoding=rope",
                "model.rope_theta=500.0")


def _compare(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
  """Max abs logit difference and the largest per-token KL(ours || theirs)."""
  ours, theirs = ours.astype(np.float64), theirs.astype(np.float64)
  lp = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
  lq = theirs - np.logaddexp.reduce(theirs, axis=-1, keepdims=True)
  kl = (np.exp(lp) * (lp - lq)).sum(-1)
  return float(np.abs(ours - theirs).max()), float(kl.max())


def test_step1_export_matches_pytorch_step1(alibi_run, tmp_path):
  out = str(tmp_path / "hf")
  export_checkpoint(alibi_run, out, dtype="float32")
  model = Step1ForCausalLM.from_pretrained(out)
  with torch.no_grad():
    theirs = model(torch.tensor([TOKENS]))[0].numpy()
  ours = score(alibi_run, TOKENS)
  diff, kl = _compare(ours, theirs)
  print(f"Step1 fp32 parity: max |dlogit| {diff:.2e}, max per-token KL {kl:.2e}")
  assert ours.std() > 0.1  # a distribution with something to lose
  assert diff < 1e-4 and kl < 1e-6


def test_rope_export_loads_in_transformers_llama(rope_run, tmp_path):
  out = str(tmp_path / "hf")
  export_checkpoint(rope_run, out, dtype="float32")
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
  assert cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"] is False
  model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = model(torch.tensor([TOKENS])).logits[0].numpy()
  ours = score(rope_run, TOKENS)
  diff, kl = _compare(ours, theirs)
  print(f"Llama fp32 parity: max |dlogit| {diff:.2e}, max per-token KL {kl:.2e}")
  assert diff < 1e-4 and kl < 1e-6


def test_layout_shards_and_dtypes(alibi_run, tmp_path):
  f32, bf16 = str(tmp_path / "f32"), str(tmp_path / "bf16")
  export_checkpoint(alibi_run, f32, dtype="float32")
  assert cli.main(["export", alibi_run, bf16, "--max-shard-size", "100KB"]) == 0
  index = json.load(open(os.path.join(bf16, "model.safetensors.index.json")))
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and all(os.path.getsize(os.path.join(bf16, f)) < 140_000 for f in files)
  cfg = json.load(open(os.path.join(bf16, "config.json")))
  assert cfg["architectures"] == ["Step1ForCausalLM"] and cfg["model_type"] == "step1"
  assert (cfg["num_attention_groups"], cfg["torch_dtype"], cfg["bos_token_id"]) == (2, "bfloat16", 1)
  names = {f"model.layers.1.{n}.weight" for n in ("self_attn.q_proj", "self_attn.k_proj",
           "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
           "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}
  assert names | {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(
      index["weight_map"])
  a, b = SafetensorsDir(f32), SafetensorsDir(bf16)
  assert a.get("model.layers.0.self_attn.q_proj.weight").shape == (64, 64)
  assert a.get("model.layers.0.self_attn.k_proj.weight").shape == (32, 64)
  assert a.get("lm_head.weight").shape == (512, 64)
  for name in index["weight_map"]:
    assert b.get(name).dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(b.get(name), a.get(name).astype(ml_dtypes.bfloat16))
  # The layout itself: q_proj row n*H + h, column d is wq[d, n, h] of layer 0.
  wq = CheckpointReader(alibi_run).read(("params", "model", "lm", "layers", "wq"), (0,))
  np.testing.assert_array_equal(a.get("model.layers.0.self_attn.q_proj.weight")[1 * 16 + 3],
                                wq[:, 1, 3])


def test_export_import_export_is_bitwise(alibi_run, tmp_path):
  first, run2, second = (str(tmp_path / n) for n in ("first", "imported", "second"))
  export_checkpoint(alibi_run, first, dtype="bfloat16", max_shard_size="200KB")
  assert cli.main(["import", first, run2, "--config", TINY, "train.seq_len=32"]) == 0
  export_checkpoint(run2, second, dtype="bfloat16", max_shard_size="200KB")
  a, b = SafetensorsDir(first), SafetensorsDir(second)
  assert sorted(a.keys()) == sorted(b.keys())
  for name in a.keys():
    assert a.get(name).tobytes() == b.get(name).tobytes(), name
  assert load_config(os.path.join(run2, "config.yaml")).train.run_dir == run2


def test_imported_checkpoint_resumes(alibi_run, tmp_path):
  hf, run2 = str(tmp_path / "hf"), str(tmp_path / "imported")
  export_checkpoint(alibi_run, hf, dtype="float32")
  import_hf(hf, run2, config=TINY, overrides=RUN)
  lines = []
  cfg = load_config(os.path.join(run2, "config.yaml"), ["train.steps=1"])
  history = train(cfg, print_fn=lambda *a, **k: lines.append(" ".join(map(str, a))))
  assert any("resumed from" in line and "step 0" in line for line in lines)
  assert history and np.isfinite(history[-1]["loss"])


def _text_only_copy(src: str, dst: str, vocab: int) -> None:
  """The export with its vocabulary cut to `vocab` rows: a text-only source model."""
  os.makedirs(dst)
  tensors = SafetensorsDir(src)
  plans = []
  for name in tensors.keys():
    value = np.array(tensors.get(name))
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
      value = value[:vocab]
    plans.append(TensorPlan(name, value.shape, value.dtype, lambda v=value: [v]))
  write_file(os.path.join(dst, "model.safetensors"), plans, {"format": "pt"})
  cfg = json.load(open(os.path.join(src, "config.json")))
  json.dump({**cfg, "vocab_size": vocab}, open(os.path.join(dst, "config.json"), "w"))


def test_import_text_only_expands_vocabulary(alibi_run, tmp_path):
  hf, small, run2 = str(tmp_path / "hf"), str(tmp_path / "small"), str(tmp_path / "run")
  export_checkpoint(alibi_run, hf, dtype="float32")
  _text_only_copy(hf, small, 320)
  import_hf(small, run2, config=TINY, overrides=["train.seq_len=32"])
  reader = CheckpointReader(run2)
  embed = reader.read(("params", "model", "lm", "embed"))
  head = reader.read(("params", "model", "lm", "lm_head"))
  assert embed.shape == (512, 64) and head.shape == (64, 512)
  src = SafetensorsDir(small)
  np.testing.assert_array_equal(embed[:320], src.get("model.embed_tokens.weight"))
  np.testing.assert_array_equal(head[:, :320], src.get("lm_head.weight").T)
  np.testing.assert_allclose(head[:, 400], head[:, :320].mean(1), atol=1e-7)


def test_bad_inputs_name_the_file_and_fix(alibi_run, tmp_path):
  hf = str(tmp_path / "hf")
  export_checkpoint(alibi_run, hf, dtype="float32")
  cfg_path = os.path.join(hf, "config.json")
  good = json.load(open(cfg_path))

  json.dump({**good, "architectures": ["GPT2LMHeadModel"]}, open(cfg_path, "w"))
  with pytest.raises(ExportError, match=r"config\.json: architecture 'GPT2LMHeadModel'"):
    import_hf(hf, str(tmp_path / "a"), config=TINY)

  json.dump({**good, "intermediate_size": 128}, open(cfg_path, "w"))
  with pytest.raises(ExportError, match=r"safetensors: tensor model\.layers\.0\.mlp\.gate_proj"
                                        r"\.weight has shape \[176, 64\] but .*config\.json"):
    import_hf(hf, str(tmp_path / "b"), config=TINY)

  json.dump({**good, "num_hidden_layers": 3}, open(cfg_path, "w"))
  with pytest.raises(ExportError, match=r"model\.layers\.2\..* is missing"):
    import_hf(hf, str(tmp_path / "c"), config=TINY)

  with pytest.raises(ExportError, match="neither a run directory"):
    export_checkpoint(str(tmp_path), str(tmp_path / "out"))
  copy = str(tmp_path / "run")
  shutil.copytree(alibi_run, copy)
  cfg = load_config(os.path.join(copy, "config.yaml"), ["model.intermediate_size=128"])
  dump_config(cfg, os.path.join(copy, "config.yaml"))
  with pytest.raises(ExportError, match=r"w_gate has shape \[2, 64, 176\] but .*config\.yaml"):
    export_checkpoint(copy, str(tmp_path / "out"))


def test_score_command_writes_logits(alibi_run, tmp_path):
  out = str(tmp_path / "logits.npy")
  assert cli.main(["score", alibi_run, "--tokens", "1,5,9", "--out", out]) == 0
  logits = np.load(out)
  assert logits.shape == (3, 512) and logits.dtype == np.float32
  np.testing.assert_array_equal(logits, score(alibi_run, [1, 5, 9]))


def test_export_check_compares_with_pytorch(alibi_run, rope_run, tmp_path, capsys):
  for name, run in (("alibi", alibi_run), ("rope", rope_run)):
    assert cli.main(["export", run, str(tmp_path / name), "--dtype", "float32", "--check"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("parity of the float32 export in PyTorch vs stepaudio score") \
        and line.endswith(": ok"), line
    assert float(line.split("max |dlogit| ")[1].split(",")[0]) < 1e-4
