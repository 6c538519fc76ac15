"""The phone CTC encoder: CTC loss against torch, greedy decoding and edit distance, a short run
through the trainer on learnable tone "speech", padding invariance, save/load, and the one-line
errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from data_pipelines.features import log_mel, num_frames
from stepaudio_jax.config import ConfigError
from stepaudio_jax.data.phone_pairs import BLANK, read_phone_file, write_phone_file
from stepaudio_jax.data.source import next_global_batch
from stepaudio_jax.export.phone_encoder import (
  encoder_states,
  load_phone_encoder,
  phone_encoder_config,
  save_phone_encoder,
)
from stepaudio_jax.models.phone_encoder import PhoneEncoder, PhoneEncoderConfig, subsampled
from stepaudio_jax.tasks.base import Split
from stepaudio_jax.tasks.phone_ctc import ctc_loss_sum, edit_distance, greedy_phones
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.checkpoint import restore_params
from stepaudio_jax.training.setup import setup
from stepaudio_jax.training.trainer import train
from tests.conftest import REPO

TINY = os.path.join(REPO, "configs", "tokenizer", "phone_ctc_tiny.yaml")
RATE = 16_000


def tone_utterances(n: int, phones: int, seed: int, max_phones: int = 7):
  """Learnable stand-in speech: phone k is two tones (300 * 1.35^k Hz and 2.5x that) held
  50-130 ms with 10 ms ramps; per utterance a 'speaker' scales every pitch by 0.92-1.08 and the
  gain by 0.05-0.5, over a little noise. No phone follows itself. Returns (mels, ids)."""
  rng = np.random.default_rng(seed)
  base = 300.0 * 1.35 ** np.arange(phones)
  mels, ids = [], []
  for _ in range(n):
    shift, gain = rng.uniform(0.92, 1.08), rng.uniform(0.05, 0.5)
    seq, length = [int(rng.integers(1, phones + 1))], rng.integers(3, max_phones + 1)
    while len(seq) < length:
      seq.append(int((seq[-1] - 1 + rng.integers(1, phones)) % phones + 1))
    pieces = [np.zeros(int(rng.integers(800, 1600)))]
    for p in seq:
      t = np.arange(int(rng.uniform(0.05, 0.13) * RATE)) / RATE
      ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)
      f = base[p - 1] * shift
      pieces += [ramp * (np.sin(2 * np.pi * f * t) + 0.5 * np.sin(2 * np.pi * 2.5 * f * t)),
                 np.zeros(int(rng.integers(0, 320)))]
    pieces.append(np.zeros(int(rng.integers(800, 1600))))
    wave = gain * np.concatenate(pieces) + 1e-3 * rng.standard_normal(sum(map(len, pieces)))
    mels.append(log_mel(wave.astype(np.float32), 80))
    ids.append(seq)
  return mels, ids


def write_tones(path: str, n: int, seed: int, phones: int = 8) -> None:
  mels, ids = tone_utterances(n, phones, seed)
  inventory = [BLANK] + [f"t{k}" for k in range(1, phones + 1)]
  write_phone_file(path, mels, ids, inventory, [f"spk{i % 5}" for i in range(n)],
                   ["tone"] * n, [" ".join(inventory[p] for p in s) for s in ids])


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
  d = tmp_path_factory.mktemp("tones")
  write_tones(str(d / "train.safetensors"), 400, seed=0)
  write_tones(str(d / "eval.safetensors"), 32, seed=1)
  return str(d)


def tiny(tones, run_dir, *overrides):
  return load_config(TINY, [f"train.run_dir={run_dir}",
                            f"phone_ctc.train_path={tones}/train.safetensors",
                            f"phone_ctc.eval_path={tones}/eval.safetensors", *overrides])


def test_ctc_loss_equals_torch():
  """Summed CTC negative log-likelihood, ragged rows, within 1e-4 relative of torch's."""
  rng = np.random.default_rng(0)
  b, s, v, lmax = 4, 30, 7, 10
  logits = rng.standard_normal((b, s, v)).astype(np.float32) * 3
  symbols, n_phones = np.array([30, 24, 17, 9]), np.array([10, 7, 5, 2])
  phones = rng.integers(1, v, (b, lmax)).astype(np.int32)
  phones[0, 3] = phones[0, 2]  # a repeat needs a blank between
  logp = jax.nn.log_softmax(jnp.asarray(logits), -1)
  ours = ctc_loss_sum(logp, jnp.asarray(symbols), jnp.asarray(phones), jnp.asarray(n_phones))
  ref = torch.nn.functional.ctc_loss(
      torch.log_softmax(torch.tensor(logits), -1).transpose(0, 1),
      torch.cat([torch.tensor(phones[i, :n_phones[i]], dtype=torch.long) for i in range(b)]),
      torch.tensor(symbols), torch.tensor(n_phones), blank=0, reduction="none")
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-4)
  empty = ctc_loss_sum(logp, jnp.zeros(b, jnp.int32), jnp.asarray(phones), jnp.zeros(b, jnp.int32))
  assert not np.asarray(empty).any()


def _levenshtein(a, b):
  d = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    prev, d[0] = d[0], i
    for j, y in enumerate(b, 1):
      prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
  return d[-1]


def test_greedy_decoding_and_edit_distance():
  best = np.array([[0, 3, 3, 0, 3, 5, 5, 0, 2, 2], [1, 1, 0, 0, 4, 0, 0, 0, 0, 0]])
  logp = jax.nn.one_hot(jnp.asarray(best), 6)
  hyp, n = greedy_phones(logp, jnp.asarray([10, 5]))
  assert n.tolist() == [4, 2]
  assert hyp[0, :4].tolist() == [3, 3, 5, 2] and hyp[1, :2].tolist() == [1, 4]
  rng = np.random.default_rng(1)
  hyp = rng.integers(1, 4, (16, 9)).astype(np.int32)
  ref = rng.integers(1, 4, (16, 7)).astype(np.int32)
  nh, nr = rng.integers(0, 10, 16), rng.integers(0, 8, 16)
  got = edit_distance(jnp.asarray(hyp), jnp.asarray(nh), jnp.asarray(ref), jnp.asarray(nr))
  assert got.tolist() == [_levenshtein(hyp[i, :nh[i]], ref[i, :nr[i]]) for i in range(16)]


def test_training_lowers_loss_and_phone_error_rate(tones, tmp_path):
  """150 steps of the tiny encoder on tone speech: the train CTC loss per phone falls below
  half its start and the eval phone error rate from ~1 to under 0.35."""
  cfg = tiny(tones, tmp_path)
  run = setup(cfg)
  source, state = run.task.make_source(Split.EVAL), run.init()
  sums = [run.eval(state, next_global_batch(source, run.batch)) for _ in range(2)]
  start = run.task.eval_metrics({k: sum(np.asarray(s[k]) for s in sums) for k in sums[0]})
  history = train(cfg, print_fn=lambda *a, **k: None)
  with open(tmp_path / "metrics.jsonl") as f:
    evals = [r for r in map(json.loads, f) if r["kind"] == "eval"]
  first = np.mean([h["loss"] for h in history[:5]])
  last = np.mean([h["loss"] for h in history[-5:]])
  print(f"train loss {first:.3f} -> {last:.3f}; eval per {start['per']:.3f} -> "
        f"{[round(e['per'], 3) for e in evals]}")
  assert last < 0.5 * first, (first, last)
  assert start["per"] > 0.9 and evals[-1]["per"] < 0.35, (start, evals)
  out = tmp_path / "encoder.safetensors"
  header = save_phone_encoder(str(tmp_path), str(out))
  assert header["step"] == 150 and header["phones"][0] == BLANK
  model = load_phone_encoder(str(out))
  trained = run.task.merge("encoder", restore_params(str(tmp_path)), {"encoder": {}})
  mel, _ = read_phone_file(f"{tones}/eval.safetensors").utterance(0)
  np.testing.assert_array_equal(encoder_states(model, mel), encoder_states(trained, mel))


def _model(**kw):
  cfg = PhoneEncoderConfig(dim=32, layers=2, heads=2, ffn=64, kernel=5, code_layer=1, **kw)
  return PhoneEncoder(cfg, 80, 9, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("samples", [1, 159, 160, 961, 5000, 13_333])
def test_states_have_one_row_per_60_ms(samples):
  """T60 = ceil(T10 / 6) = features.num_frames(samples, 60): the conv output, its mask and the
  states for one utterance."""
  mel = log_mel(np.random.default_rng(0).standard_normal(samples).astype(np.float32), 80)
  model, want = _model(), num_frames(samples, 60)
  x, mask = model.front(jnp.asarray(mel)[None], jnp.asarray([len(mel)]))
  assert x.shape[1] == int(mask.sum()) == int(subsampled(jnp.asarray(len(mel)))) == want
  assert encoder_states(model, mel).shape == (want, 32)


def test_states_do_not_depend_on_the_padding():
  """One utterance of 50 frames unpadded and padded to 64 and 256 frames (the buckets of 50 and
  200 frames): equal states within 1e-5, also through the CTC head, and zeros past its end."""
  model = _model()
  mel = np.random.default_rng(0).standard_normal((50, 80)).astype(np.float32) * 3 - 5
  padded = [jnp.asarray(np.pad(mel, ((0, n - 50), (0, 0))))[None] for n in (50, 64, 256)]
  states = [model.states(m, jnp.asarray([50]))[0][0] for m in padded]
  logp = [model(m, jnp.asarray([50]))[0][0] for m in padded]
  for s, lp in zip(states[1:], logp[1:]):
    np.testing.assert_allclose(s[:9], states[0], atol=1e-5)
    np.testing.assert_allclose(lp[:18], logp[0], atol=1e-5)
    assert not np.asarray(s[9:]).any()
  np.testing.assert_allclose(encoder_states(model, mel), states[0], atol=1e-5)


def test_states_do_not_depend_on_speaker_gain():
  """CMVN: a gain (a constant log-mel offset) leaves the states as they were."""
  model = _model()
  mel = np.random.default_rng(0).standard_normal((120, 80)).astype(np.float32)
  np.testing.assert_allclose(encoder_states(model, mel), encoder_states(model, mel + 2.0),
                             atol=1e-4)


def test_missing_file_names_the_key(tmp_path):
  cfg = tiny(str(tmp_path), tmp_path / "run")
  with pytest.raises(ConfigError, match=r"^phone_ctc.train_path=.*does not exist.*") as e:
    setup(cfg)
  assert "\n" not in str(e.value)


def test_bad_options_are_one_line_errors(tones, tmp_path):
  for override, match in (("phone_ctc.encoder.code_layer=3", "code_layer=3 must name a block"),
                          ("phone_ctc.encoder.heads=5", "dim=48 must divide by heads=5"),
                          ("phone_ctc.max_frames=0", "max_frames and max_phones must be")):
    with pytest.raises(ConfigError, match=match) as e:
      tiny(tones, tmp_path, override)
    assert "\n" not in str(e.value)
  run = setup(tiny(tones, tmp_path, "phone_ctc.max_frames=100"))
  with pytest.raises(ConfigError, match=r"raise phone_ctc.max_frames to \d+$") as e:
    run.task.make_source(Split.TRAIN)
  assert "\n" not in str(e.value)
  run = setup(tiny(tones, tmp_path, "phone_ctc.max_phones=4"))
  with pytest.raises(ConfigError, match=r"raise phone_ctc.max_phones to 7$"):
    run.task.make_source(Split.TRAIN)


def test_saved_file_is_not_a_checkpoint(tmp_path):
  path = tmp_path / "x.safetensors"
  write_tones(str(path), 2, seed=0)
  with pytest.raises(ValueError, match="is no saved phone encoder"):
    phone_encoder_config(str(path))
