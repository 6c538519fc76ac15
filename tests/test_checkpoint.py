"""Checkpoints: exact round trip onto other shardings, keep K, corrupt ones and those of another
layout refused loudly, partial ones skipped, never a silent restart; init_from a text-only model
(vocabulary expansion)."""

import hashlib
import json
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from stepaudio_jax import cli
from stepaudio_jax.export.orbax_reader import CheckpointReader, ExportError
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training import trainer
from stepaudio_jax.training.checkpoint import (
  CheckpointConfig,
  Checkpointer,
  CheckpointError,
  restore_params,
)
from tests.conftest import step0_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
FAST = ["train.seq_len=64", "train.log_every=1", "train.peak_flops_per_device=1e12"]
# Saves at 2, 4, 6 with keep=2.
SAVED = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=2"]


def _train(run_dir, *overrides):
  lines = []
  history = trainer.train(load_config(TINY, [f"train.run_dir={run_dir}", *FAST, *overrides]),
                          print_fn=lambda *a, **_: lines.append(" ".join(map(str, a))))
  return history, "\n".join(lines)


def _snapshot(directory) -> dict:
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("saved") / "run"
  _train(run_dir, *SAVED)
  return run_dir


@pytest.fixture
def run_copy(saved_run, tmp_path):
  shutil.copytree(saved_run, tmp_path / "run")
  return tmp_path / "run"


def test_every_leaf_round_trips_onto_other_shardings(tmp_path):
  """Params, optimizer moments, step, RNG and the data iterator state come back exactly."""
  devices = np.array(jax.devices())
  put = lambda x, mesh, spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))  # noqa: E731
  a = Mesh(devices.reshape(2, 4), ("x", "y"))
  b = Mesh(devices[:4].reshape(4), ("z",))
  rng = np.random.default_rng(0)
  host = {"params": rng.normal(size=(8, 16)).astype(np.float32),
          "mu": rng.normal(size=(8, 16)).astype(np.float32),
          "step": np.int32(7), "rng": np.asarray(jax.random.key_data(jax.random.key(3)))}
  specs_a = {"params": ("x", "y"), "mu": ("y", None), "step": (), "rng": ()}
  specs_b = {"params": (None, "z"), "mu": ("z",), "step": (), "rng": ()}
  ckpt = Checkpointer(str(tmp_path), CheckpointConfig(every=1))
  ckpt.save(7, {k: put(v, a, specs_a[k]) for k, v in host.items()}, {"step": 7})
  ckpt.wait()
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(b, P(*specs_b[k])))
            for k, v in host.items()}
  state, data = ckpt.restore(7, target)
  ckpt.close()
  assert data["step"] == 7 and data["layout"] == 2
  # Each array's checksum is the uint32 sum of its bits, here recomputed with NumPy.
  assert data["checksums"] == {k: int(np.asarray(v).view(np.uint32).sum(dtype=np.uint32))
                               for k, v in host.items()}
  for k, v in host.items():
    assert state[k].sharding == target[k].sharding, k
    np.testing.assert_array_equal(np.asarray(state[k]), v, err_msg=k)


def test_keeps_the_newest_k(saved_run):
  assert sorted(os.listdir(saved_run / "checkpoints"), key=int) == ["4", "6"]


def _flip_bytes(path):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    for i in range(len(data) // 4, len(data) // 2):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", [_flip_bytes, _truncate], ids=["flipped", "truncated"])
def test_corrupt_checkpoint_is_refused(run_copy, damage, capsys):
  ckpt = run_copy / "checkpoints"
  # The array data files of the newest step (OCDBT data under state/**/d/).
  data_files = [os.path.join(root, n) for root, _, names in os.walk(ckpt / "6" / "state")
                if os.path.basename(root) == "d" for n in names]
  assert data_files
  for path in data_files:
    damage(path)
  before = _snapshot(ckpt)
  code = cli.main(["train", TINY, f"train.run_dir={run_copy}", *FAST, "train.steps=8",
                   "checkpoint.every=2", "checkpoint.keep=2"])
  out, err = capsys.readouterr()
  assert code == 2
  assert "checkpoint step 6" in err and "cannot be restored" in err, err[-3000:]
  assert "starting at step 0" not in out and "step 1/" not in out, out
  assert _snapshot(ckpt) == before  # nothing deleted, nothing written


@pytest.mark.parametrize("layout", [1, None], ids=["layout1", "no-layout"])
def test_checkpoint_of_another_layout_is_refused(run_copy, layout, capsys):
  """Resume, init_from and the export reader all refuse it, in one line naming the step."""
  step_dir = run_copy / "checkpoints" / "6"
  with open(step_dir / "data" / "metadata") as f:
    data = json.load(f)
  if layout is None:
    del data["layout"]
  else:
    data["layout"] = layout
  with open(step_dir / "data" / "metadata", "w") as f:
    json.dump(data, f)
  found = "no layout" if layout is None else f"layout {layout}"
  message = (f"{step_dir} was not written by this version of stepaudio_jax (its data item has "
             f"{found}; this version reads layout 2)")
  before = _snapshot(run_copy / "checkpoints")
  code = cli.main(["train", TINY, f"train.run_dir={run_copy}", *FAST, "train.steps=8",
                   "checkpoint.every=2", "checkpoint.keep=2"])
  out, err = capsys.readouterr()
  assert code == 2
  assert f"stepaudio train: error: {message}\n" in err, err[-3000:]
  assert "step 1/" not in out, out
  assert _snapshot(run_copy / "checkpoints") == before
  with pytest.raises(CheckpointError) as refused:
    restore_params(str(run_copy))
  assert str(refused.value) == message
  with pytest.raises(ExportError) as refused:
    CheckpointReader(str(run_copy))
  assert str(refused.value) == message


def test_partial_checkpoint_is_skipped_loudly(run_copy, caplog):
  ckpt = run_copy / "checkpoints"
  # What a save cut short leaves: a newer step under Orbax's temporary name, half written.
  leftover = "8.orbax-checkpoint-tmp-1712345678901234"
  shutil.copytree(ckpt / "6", ckpt / leftover)
  shutil.rmtree(ckpt / leftover / "state")
  with caplog.at_level(logging.WARNING):
    history, out = _train(run_copy, "train.steps=7", "checkpoint.every=2", "checkpoint.keep=2")
  assert any(leftover in r.getMessage() and "IGNORING" in r.getMessage() for r in caplog.records)
  assert "at step 6" in out, out
  assert [h["step"] for h in history] == [7]


def test_resume_false_with_checkpoints_is_an_error(run_copy):
  before = _snapshot(run_copy / "checkpoints")
  with pytest.raises(CheckpointError, match="choose a new train.run_dir"):
    _train(run_copy, *SAVED, "checkpoint.resume=false")
  assert _snapshot(run_copy / "checkpoints") == before


def test_init_from_a_run_without_checkpoints_is_an_error(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(CheckpointError, match="no complete checkpoint"):
    restore_params(str(tmp_path))
  with pytest.raises(CheckpointError, match="has no"):
    restore_params(str(tmp_path / "missing"))
  assert not (tmp_path / "missing").exists()


# A text-only model: 320 text ids, no audio codes, no image encoder; ids 0..319 keep their
# meaning in the Step-Omni layout of configs/tiny.yaml (text vocabulary 320).
TEXT_ONLY = ["model.vocab_size=320", "tokens.linguistic_codes=0", "tokens.semantic_codes=0",
             "vision.enabled=false", "synthetic.audio_weight=0", "synthetic.image_weight=0"]


def test_init_from_expands_the_vocabulary(tmp_path):
  text_dir = tmp_path / "text"
  _train(text_dir, "train.steps=2", *TEXT_ONLY)
  text = ocp.StandardCheckpointer().restore(text_dir / "checkpoints" / "2" / "state")
  text_lm = jax.tree.map(np.asarray, text["params"]["model"]["lm"])

  started = step0_params(TINY, f"train.run_dir={tmp_path / 'omni'}", *FAST,
                         f"checkpoint.init_from={text_dir}")["model"]["lm"]
  embed, head = started["embed"], started["lm_head"]
  old = text_lm["embed"].shape[0]
  assert (old, embed.shape[0], head.shape[1]) == (320, 512, 512)
  # Old rows and columns, and the whole backbone, are the text model's bit for bit.
  np.testing.assert_array_equal(embed[:old], text_lm["embed"])
  np.testing.assert_array_equal(head[:, :old], text_lm["lm_head"])
  rest = lambda lm: {k: v for k, v in lm.items() if k not in ("embed", "lm_head")}  # noqa: E731
  jax.tree.map(np.testing.assert_array_equal, rest(started), rest(text_lm))
  # New LM-head columns: the mean of the old ones (old-token distribution unchanged).
  np.testing.assert_allclose(head[:, old:], np.repeat(text_lm["lm_head"].mean(1, keepdims=True),
                                                      512 - old, axis=1), rtol=1e-6)
  # New embedding rows: Gaussian with the old rows' per-dimension mean and std. Standardised,
  # they are 192 x 64 N(0, 1) draws: sample mean and std are within ~0.01 of 0 and 1, so 0.05
  # is over 5 sigma (and the draw is seeded); zeros, copies of the mean or a differently
  # scaled init fail.
  z = (embed[old:] - text_lm["embed"].mean(0)) / text_lm["embed"].std(0)
  assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05, (z.mean(), z.std())
  assert len(np.unique(embed[old:], axis=0)) == 512 - old
