"""HiFi-GAN vocoder task: LSGAN losses by hand, the torch-equivalent upsampling, the divergence
guard, and a short training run whose mel loss falls."""

import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from stepaudio_jax.models.speech_layers import ConvTranspose1d
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.tasks.vocoder import VocoderTask, discriminator_loss, generator_losses
from stepaudio_jax.training.trainer import train
from tests.conftest import REPO

VOCODER = os.path.join(REPO, "configs", "speech", "vocoder_tiny.yaml")
PAIRS = os.path.join(REPO, "data_pipelines", "corpus", "speech")
SMALL = [f"speech_data.path={PAIRS}", "vocoder.channels=8", "vocoder.resblock_kernels=[3]",
         "vocoder.resblock_dilations=[1]", "vocoder.mpd_channels=[4,4,4,4]",
         "vocoder.mrd_channels=4", "vocoder.segment=1024", "train.batch_size=8",
         "train.eval_every=0", "vocoder.periods=[2,3]", "vocoder.resolutions=[[256,64,256]]"]


def test_lsgan_losses_by_hand():
  real = [(jnp.array([1.0, 0.5]), [jnp.array([1.0, 2.0])]), (jnp.array([0.0]), [jnp.array([3.0])])]
  fake = [(jnp.array([0.0, 0.5]), [jnp.array([2.0, 2.0])]), (jnp.array([1.0]), [jnp.array([1.0])])]
  # D: mean((1 - [1, .5])^2) + mean([0, .5]^2) + (1 - 0)^2 + 1^2 = .125 + .125 + 1 + 1
  assert float(discriminator_loss(real, fake)) == pytest.approx(2.25)
  adv, fm = generator_losses(real, fake)
  assert float(adv) == pytest.approx(0.5 * (1 + 0.25) + 0.0)  # mean((1-[0,.5])^2) + (1-1)^2
  assert float(fm) == pytest.approx(0.5 + 2.0)  # mean|[1,2]-[2,2]| + |3-1|


def test_upsampling_equals_torch_conv_transpose():
  layer = ConvTranspose1d(3, 2, 16, 8, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).standard_normal((1, 5, 3)).astype(np.float32)
  w = np.asarray(layer.weight[...])[::-1].transpose(1, 2, 0).copy()  # -> torch [in, out, k]
  ref = torch.nn.functional.conv_transpose1d(torch.from_numpy(x).transpose(1, 2),
                                             torch.from_numpy(w), stride=8, padding=4)
  got = np.asarray(layer(jnp.asarray(x)))
  assert got.shape == (1, 40, 2)
  np.testing.assert_allclose(got, ref.transpose(1, 2).numpy(), atol=1e-5)


def test_diverging_discriminator_stops_the_run_unsaved(tmp_path):
  """Its loss past vocoder.d_loss_limit at step 1: the run stops there, before that step's
  save, naming the vocoder's own optimizers."""
  cfg = load_config(VOCODER, [f"train.run_dir={tmp_path}", "train.steps=2",
                              "checkpoint.every=1", "vocoder.d_loss_limit=0.01", *SMALL])
  with pytest.raises(FloatingPointError) as e:
    train(cfg, print_fn=lambda *a, **k: None)
  assert re.fullmatch(
      r"step 1: discriminator/loss \S+ passed vocoder.d_loss_limit=0.01, the discriminator is "
      r"diverging \(resume with a lower vocoder.discriminator_optimizer.learning_rate, or a "
      r"generator that keeps up: vocoder.generator_optimizer\); stopping without "
      r"checkpointing it \(no checkpoint was written\)", str(e.value)), str(e.value)
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  task = VocoderTask(cfg, None)
  assert task.stop_reason({"discriminator/loss": 0.01, "generator/loss": 1e3}) is None


@pytest.mark.slow
def test_mel_loss_falls_on_the_committed_pairs(tmp_path):
  cfg = load_config(VOCODER, [f"train.run_dir={tmp_path}", "train.steps=30",
                              "train.log_every=30", *SMALL])
  history = train(cfg, print_fn=lambda *a, **k: None)
  first = np.mean([h["generator/mel_l1"] for h in history[:3]])
  last = np.mean([h["generator/mel_l1"] for h in history[-3:]])
  assert last < 0.8 * first, (first, last)
  assert all(np.isfinite(h["discriminator/loss"]) for h in history)
  assert set(history[-1]) >= {"generator/adv", "generator/fm", "discriminator/loss"}


@pytest.mark.parametrize("segment,needles", [
    (65536, ("vocoder.segment=65536 samples is longer than every training utterance",
             "the longest has 23,814 samples", "at most 23808")),
    (1000, ("vocoder.segment=1000 must be a multiple of mel.hop=256, e.g. 1024",)),
])
def test_a_segment_the_data_cannot_fill_is_one_error_line(tmp_path, capsys, segment, needles):
  """vocoder.segment=65536 against utterances of at most 23,814 samples is refused in one line
  (it would train on rows of >= 64% zero padding)."""
  from stepaudio_jax import cli

  code = cli.main(["train", VOCODER, *SMALL, f"vocoder.segment={segment}",
                   f"train.run_dir={tmp_path}"])
  err = capsys.readouterr().err
  assert code == 2, err
  (line,) = [ln for ln in err.splitlines() if ln.startswith("stepaudio train: error:")]
  for needle in needles:
    assert needle in line, line
