"""The trainer learns from the committed corpus through the Grain loaders (configs/corpus.yaml)."""

import numpy as np

from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.trainer import train


def test_tiny_omni_learns_the_committed_corpus(tmp_path):
  cfg = load_config("configs/corpus.yaml", [f"train.run_dir={tmp_path}", "train.steps=60",
                                            "train.eval_every=0", "checkpoint.every=1000",
                                            "train.peak_flops_per_device=1e12"])
  history = train(cfg, print_fn=lambda *a, **k: None)
  losses = [h["loss"] for h in history]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
  seen = {k: sum(h[k] for h in history) for k in history[0] if k.startswith("tokens/")}
  for kind in ("text", "audio_linguistic", "audio_semantic", "image_caption"):
    assert seen[f"tokens/{kind}"] > 0, kind
