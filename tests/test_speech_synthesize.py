"""`stepaudio synthesize`: parsing the text, LM ids -> codes, and the whole chain end to end."""

import os
import re

import numpy as np
import pytest
from scipy.io import wavfile

from stepaudio_jax.cli import main
from stepaudio_jax.config import dump_config
from stepaudio_jax.config.model import TokenLayout
from stepaudio_jax.experiments.synthesize import codes_from_tokens, no_codes_error, split_tags
from stepaudio_jax.inference.speech import SynthesisError
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.trainer import train
from tests.conftest import REPO

PAIRS = os.path.join(REPO, "data_pipelines", "corpus", "speech")


def test_split_tags():
  assert split_tags("(English)(slow 1) one plus one.") == ("(English)(slow 1)", "one plus one.")
  assert split_tags(" (Cantonese) (fast 2) hi") == ("(Cantonese)(fast 2)", "hi")
  assert split_tags("no tags here") == ("", "no tags here")
  for text in ("", "(English)", "(English)(slow 1)  "):
    with pytest.raises(SynthesisError, match="nothing to say"):
      split_tags(text)


def test_split_tags_refuses_tags_the_corpus_does_not_have():
  with pytest.raises(SynthesisError, match=r"unknown instruction tags \(Klingon\), \(warp 9\) "
                     r".*knows language: \(English\), \(Chinese\), \(Cantonese\); speed: "
                     r"\(slow 2\), \(slow 1\), \(fast 1\), \(fast 2\)$"):
    split_tags("(Klingon)(warp 9) engage.")
  with pytest.raises(SynthesisError, match=r"unknown instruction tag \(english\) "):
    split_tags("(english) hi")
  with pytest.raises(SynthesisError, match=r"more than one speed; keep one of \(slow 2\)"):
    split_tags("(English)(slow 1)(fast 1) hi")


def _refused(capsys, argv: list[str], match: str) -> None:
  """`stepaudio synthesize ...` exits 2 with one error line matching `match`."""
  capsys.readouterr()
  assert main(["synthesize", *argv]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("stepaudio synthesize: error: "), err
  assert re.search(match, err[0]), err[0]


def test_synthesize_refuses_bad_input_in_one_line(tmp_path, capsys):
  """Text, voice prompt and runs are checked before anything is loaded or sampled."""
  missing = str(tmp_path / "no_run")
  runs = ["--lm", missing, "--flow", missing, "--vocoder", missing, "--out",
          str(tmp_path / "out.wav")]
  _refused(capsys, ["", *runs], r"nothing to say in '': give the words")
  _refused(capsys, ["(English)", *runs], r"nothing to say in '\(English\)'")
  _refused(capsys, ["(Klingon)(warp 9) engage.", *runs], r"unknown instruction tags \(Klingon\)")
  not_wav = tmp_path / "prompt.mp3"
  not_wav.write_bytes(b"ID3\x04" + bytes(64))
  _refused(capsys, ["(English) hi", *runs, "--prompt-wav", str(not_wav), "--prompt-text", "hi"],
           r"--prompt-wav \S+prompt.mp3 is not a WAV file .*convert it")
  empty = tmp_path / "empty.wav"
  wavfile.write(str(empty), 16000, np.zeros(0, np.int16))
  _refused(capsys, ["(English) hi", *runs, "--prompt-wav", str(empty), "--prompt-text", "hi"],
           r"empty.wav holds no samples")

  # Runs are told apart by their config's task before a checkpoint is read.
  dirs = {}
  for kind in ("tts_lm", "flow", "vocoder"):
    dirs[kind] = tmp_path / kind
    dirs[kind].mkdir()
    more = ["train.epochs=0"] if kind == "tts_lm" else []  # a steps-long run: reloads as it is
    dump_config(load_config(os.path.join(REPO, f"configs/speech/{kind}_tiny.yaml"), more),
                str(dirs[kind] / "config.yaml"))
  _refused(capsys, ["(English) hi", "--lm", str(dirs["tts_lm"]), "--flow", str(dirs["vocoder"]),
                    "--vocoder", str(dirs["flow"]), "--out", str(tmp_path / "out.wav")],
           r"--flow \S+vocoder is a task: vocoder run, not a task: flow run \(--flow and "
           r"--vocoder swapped\?\)$")


def test_an_lm_without_codes_is_told_by_how_it_stopped():
  lay = TokenLayout(text_vocab_size=1024)
  early = np.array([1024 + 5, 2048 + 1, 3])  # one linguistic and one semantic id, then EOS
  msg = str(no_codes_error(early, False, lay, "RUN", 400))
  assert msg.startswith("the LM of RUN stopped at <|EOT|> after 3 tokens with no whole 2:3 "
                        "group of audio codes (1 linguistic and 1 semantic ids")
  assert "undertrained" in msg and "max-new-tokens" not in msg
  msg = str(no_codes_error(np.full(40, 7), True, lay, "RUN", 40))
  assert msg.startswith("the LM of RUN was cut at --max-new-tokens=40 with no whole 2:3 group")
  assert "raise --max-new-tokens" in msg


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
