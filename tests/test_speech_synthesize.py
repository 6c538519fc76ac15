"""`stepaudio synthesize`: parsing the text, LM ids -> codes, and the whole chain end to end."""

import os

import numpy as np
import pytest
from scipy.io import wavfile

from stepaudio_jax.cli import main
from stepaudio_jax.config.model import TokenLayout
from stepaudio_jax.experiments.synthesize import codes_from_tokens, split_tags
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.trainer import train
from tests.conftest import REPO

PAIRS = os.path.join(REPO, "data_pipelines", "corpus", "speech")


def test_split_tags():
  assert split_tags("(English)(slow 1) one plus one.") == ("(English)(slow 1)", "one plus one.")
  assert split_tags("no tags here") == ("", "no tags here")
  with pytest.raises(ValueError, match="nothing to say"):
    split_tags("(English)")


def test_codes_from_tokens_regroups_the_audio_ids():
  lay = TokenLayout(text_vocab_size=1024)  # linguistic ids 1024.., semantic 2048..
  tokens = np.array([7, 1024 + 5, 1024 + 6, 2048 + 1, 2048 + 2, 2048 + 3, 1024 + 9, 2048 + 4, 3])
  # linguistic [5, 6, 9], semantic [1, 2, 3, 4]: one whole group, the rest dropped
  np.testing.assert_array_equal(codes_from_tokens(tokens, lay), [5, 6, 1025, 1026, 1027])
  assert codes_from_tokens(np.array([7, 3]), lay).size == 0


@pytest.mark.slow
def test_synthesize_writes_a_wav(tmp_path):
  """Tiny LM, flow and vocoder, a few steps each, then the CLI end to end."""
  runs = {}
  for name, config, extra in (
      ("lm", "configs/speech/tts_lm_tiny.yaml", ["train.epochs=0", "train.steps=4"]),
      ("flow", "configs/speech/flow_tiny.yaml", [f"speech_data.path={PAIRS}", "train.steps=2"]),
      ("vocoder", "configs/speech/vocoder_tiny.yaml",
       [f"speech_data.path={PAIRS}", "train.steps=2", "train.batch_size=8"])):
    runs[name] = str(tmp_path / name)
    train(load_config(os.path.join(REPO, config), [f"train.run_dir={runs[name]}",
                                                   "train.eval_every=0", *extra]),
          print_fn=lambda *a, **k: None)
  out = str(tmp_path / "out.wav")
  assert main(["synthesize", "(English) one plus one is two.", "--lm", runs["lm"], "--flow",
               runs["flow"], "--vocoder", runs["vocoder"], "--out", out, "--temperature", "1",
               "--top-k", "0", "--max-new-tokens", "40"]) == 0
  sr, pcm = wavfile.read(out)
  assert sr == 22050 and pcm.dtype == np.int16 and len(pcm) % 256 == 0 and len(pcm) > 0
