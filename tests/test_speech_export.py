"""Exported flow and vocoder weights reproduce the JAX outputs in the PyTorch modules."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from stepaudio_jax import cli

from stepaudio_jax.config.speech import FlowConfig, VocoderConfig
from stepaudio_jax.export.torch_speech import FlowTorch, GeneratorTorch, state_dict
from stepaudio_jax.models.flow import FlowModel
from stepaudio_jax.experiments.synthesize import load_decoder
from stepaudio_jax.models.hifigan import Generator
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.trainer import train
from tests.conftest import REPO

PAIRS = os.path.join(REPO, "data_pipelines", "corpus", "speech")

FLOW = FlowConfig(vocab=64, embed_dim=16, encoder_layers=2, encoder_heads=2, encoder_ffn=24,
                  encoder_kernel=5, dim=16, depth=2, heads=2, ffn=24)
VOC = VocoderConfig(channels=16, upsample_rates=[4, 2], upsample_kernels=[8, 4],
                    resblock_kernels=[3, 5], resblock_dilations=[1, 3])


def _randomised(module):
  """Every parameter drawn at random (zero-initialised gates would hide half the model)."""
  graph, params = nnx.split(module, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  return nnx.merge(graph, jax.tree.unflatten(tree, leaves))


def _torch(module, jax_module):
  sd = state_dict(nnx.to_pure_dict(nnx.state(jax_module, nnx.Param)))
  module.load_state_dict(sd, strict=True)
  return module.eval()


def test_flow_torch_reproduces_jax():
  jm = _randomised(FlowModel(FLOW, 8, 6, rngs=nnx.Rngs(0)))
  tm = _torch(FlowTorch(FLOW, 8, 6), jm)
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 64, (2, 10)).astype(np.int32)
  n, f = np.array([10, 7]), np.array([17, 11])
  x = rng.standard_normal((2, 17, 8)).astype(np.float32)
  spk = rng.standard_normal((2, 6)).astype(np.float32)
  t = np.array([0.2, 0.9], np.float32)
  mask = np.arange(17)[None] < f[:, None]

  @jax.jit
  def run(codes, n, f, x, mask, t, spk):
    mu = jm.encode(codes, n, f, 17)
    return mu, jm.velocity(x, mask, mu, t, jm.speaker(spk), mu * 0.5)

  mu, v = run(*map(jnp.asarray, (codes, n, f, x, mask, t, spk)))
  with torch.no_grad():
    tmu = tm.encode(torch.from_numpy(codes).long(), torch.from_numpy(n), torch.from_numpy(f), 17)
    tv = tm.velocity(torch.from_numpy(x), torch.from_numpy(mask), tmu, torch.from_numpy(t),
                     tm.speaker(torch.from_numpy(spk)), tmu * 0.5)
  np.testing.assert_allclose(tmu.numpy(), np.asarray(mu), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(tv.numpy(), np.asarray(v), atol=1e-4, rtol=1e-4)


def test_generator_torch_reproduces_jax():
  jm = _randomised(Generator(VOC, 8, rngs=nnx.Rngs(0)))
  tm = _torch(GeneratorTorch(VOC, 8), jm)
  mel = np.random.default_rng(1).standard_normal((2, 12, 8)).astype(np.float32)
  wave = np.asarray(jax.jit(jm)(jnp.asarray(mel)))
  with torch.no_grad():
    ref = tm(torch.from_numpy(mel)).numpy()
  assert wave.shape == ref.shape == (2, 12 * 8)
  np.testing.assert_allclose(ref, wave, atol=1e-4)


@pytest.mark.slow
def test_flow_and_vocoder_runs_export_and_load_strictly_in_torch(tmp_path):
  """A trained run's export: safetensors + config.json that the torch modules build from and
  load strictly, reproducing the run's JAX model; read back, the same parameters."""
  runs = {}
  for kind, config in (("flow", "flow_tiny.yaml"), ("vocoder", "vocoder_tiny.yaml")):
    runs[kind] = str(tmp_path / kind)
    train(load_config(os.path.join(REPO, "configs", "speech", config),
                      [f"train.run_dir={runs[kind]}", "train.steps=1", "train.eval_every=0",
                       f"speech_data.path={PAIRS}", "train.batch_size=8"]),
          print_fn=lambda *a, **k: None)
    assert cli.main(["export", runs[kind], str(tmp_path / f"{kind}-hf"), "--dtype",
                     "float32"]) == 0
  runs_dec = load_decoder(runs["flow"], runs["vocoder"])
  export_dec = load_decoder(str(tmp_path / "flow-hf"), str(tmp_path / "vocoder-hf"))
  for a, b in ((runs_dec.flow, export_dec.flow), (runs_dec.generator, export_dec.generator)):
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(a, nnx.Param)),
                 nnx.to_pure_dict(nnx.state(b, nnx.Param)))

  gen = GeneratorTorch.from_pretrained(str(tmp_path / "vocoder-hf"))
  mel = np.random.default_rng(2).standard_normal((1, 10, 80)).astype(np.float32)
  with torch.no_grad():
    ref = gen(torch.from_numpy(mel)).numpy()
  np.testing.assert_allclose(ref, np.asarray(jax.jit(runs_dec.generator)(jnp.asarray(mel))),
                             atol=1e-4)

  flow = FlowTorch.from_pretrained(str(tmp_path / "flow-hf"))
  jm, cfg = runs_dec.flow, runs_dec.flow_cfg
  rng = np.random.default_rng(3)
  codes = rng.integers(0, cfg.flow.vocab, (1, 10)).astype(np.int32)
  n, f = np.array([10]), np.array([21])
  x = rng.standard_normal((1, 21, 80)).astype(np.float32)
  spk = rng.standard_normal((1, cfg.speech_data.speaker_dim)).astype(np.float32)
  t, mask = np.array([0.4], np.float32), np.ones((1, 21), bool)
  mu = jm.encode(jnp.asarray(codes), jnp.asarray(n), jnp.asarray(f), 21)
  v = jm.velocity(jnp.asarray(x), jnp.asarray(mask), mu, jnp.asarray(t),
                  jm.speaker(jnp.asarray(spk)), mu * 0.5)
  with torch.no_grad():
    tmu = flow.encode(torch.from_numpy(codes).long(), torch.from_numpy(n), torch.from_numpy(f),
                      21)
    tv = flow.velocity(torch.from_numpy(x), torch.from_numpy(mask), tmu, torch.from_numpy(t),
                       flow.speaker(torch.from_numpy(spk)), tmu * 0.5)
  np.testing.assert_allclose(tv.numpy(), np.asarray(v), atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="not StepAudioFlow"):
    FlowTorch.from_pretrained(str(tmp_path / "vocoder-hf"))

  # The evidence script hears the exported decoder through the outside evaluators.
  pytest.importorskip("pocketsphinx")
  pytest.importorskip("resemblyzer")
  from stepaudio_jax.experiments.speech_evidence import LISTENING, evaluate

  summary = evaluate(str(tmp_path / "flow-hf"), str(tmp_path / "vocoder-hf"),
                     os.path.join(PAIRS, "eval.safetensors"), str(tmp_path / "evidence"), 3, 0,
                     listen=True)
  table = summary["listening"]
  assert set(table) == set(LISTENING)
  assert table["original"]["stoi"] == pytest.approx(1.0)
  assert table["original"]["wer"] <= 0.35 and table["original"]["english_clips"] == 3
  assert table["true codes -> flow -> vocoder"]["stoi"] < 0.9  # one training step
  assert "| original mel -> vocoder |" in open(tmp_path / "evidence" / "listening.md").read()
