"""Injected faults in data, export, score and the local launcher: each is named with its fix,
skipped where the config allows it, or stops the job at once instead of hanging.

Corrupt shards are real `write_shard` output with bytes flipped, cut short or emptied; which
records a flip breaks is read back with ArrayRecord itself, so the loader is held to the file."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest
from array_record.python import array_record_module

from stepaudio_jax import cli
from stepaudio_jax.config import dump_config
from stepaudio_jax.config.data import DataConfig, StageConfig
from stepaudio_jax.data.fake import write_fake_shards
from stepaudio_jax.data.loader import GrainLoader
from stepaudio_jax.data.records import RecordError, ShardError
from stepaudio_jax.export.exporter import export_checkpoint
from stepaudio_jax.export.orbax_reader import ExportError
from stepaudio_jax.export.safetensors_io import SafetensorsDir, TensorPlan, write_file
from stepaudio_jax.export.score import score
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.trainer import train
from tests.conftest import REPO
from tests.test_data_pipeline import LAYOUT, VISION, _hash

RECORDS = 16  # in the one text shard
TEXT_ONLY = [StageConfig(audio=0, image=0)]


@pytest.fixture
def shard(tmp_path) -> str:
  """One shard of RECORDS valid text records."""
  globs = write_fake_shards(str(tmp_path), LAYOUT, per_task=RECORDS, shards=1, tasks=("text",))
  (path,) = glob.glob(globs["text"][0])
  return path


def _loader(path: str, skip: bool, batch: int = 2, workers: int = 0) -> GrainLoader:
  cfg = DataConfig(source="grain", shards={"text": [path]}, stages=TEXT_ONLY, skip_malformed=skip,
                   workers=workers)
  return GrainLoader(cfg, LAYOUT, VISION, 64, batch, seed=0)


def _flip(path: str, fractions: tuple[float, ...]) -> list[int]:
  """Invert 4 bytes at each fraction of the records' span (before the zero padding that ends
  the file's first 64 KiB block); returns the records ArrayRecord can no longer read."""
  with open(path, "rb") as f:
    data = bytearray(f.read())
  end = max(i for i in range(1 << 16) if data[i])
  for frac in fractions:
    at = int(end * frac)
    data[at:at + 4] = bytes(b ^ 0xFF for b in data[at:at + 4])
  with open(path, "wb") as f:
    f.write(data)
  reader = array_record_module.ArrayRecordReader(path)
  bad = []
  for i in range(reader.num_records()):
    try:
      reader.read([i])
    except RuntimeError:
      bad.append(i)
  reader.close()
  return bad


def test_flipped_bytes_name_shard_and_record_or_are_skipped_once_each(shard):
  bad = _flip(shard, (0.3, 0.7))
  assert len(bad) == 2, bad
  records = "|".join(map(str, bad))
  strict = _loader(shard, skip=False)
  with pytest.raises(RecordError, match=rf"shard {shard} record ({records}): fails its checksum"
                                        r" .*rebuild the shard .*data\.skip_malformed=true"):
    for _ in range(40):
      strict.next_local()

  lenient = _loader(shard, skip=True)
  hashes = [_hash(lenient.next_local()) for _ in range(40)]
  draws = sum(s["draws"]["text"] for s in lenient.get_state()["streams"].values())
  assert draws > 5 * RECORDS  # every record, the bad ones too, was drawn several times
  stats = lenient.stats()
  assert stats["malformed"] == len(bad) and stats["tokens/text"] > 0

  # The count is part of the row streams' state: a resume continues it and the batches exactly.
  first = _loader(shard, skip=True)
  for _ in range(3):
    first.next_local()
  resumed = _loader(shard, skip=True)
  resumed.set_state(json.loads(json.dumps(first.get_state())))
  assert [_hash(resumed.next_local()) for _ in range(37)] == hashes[3:]
  assert resumed.stats()["malformed"] == len(bad)


def test_grain_workers_count_each_bad_record_once_too(shard):
  """Worker w of W reads every W-th draw: its first-pass draws are its share of the records."""
  bad = _flip(shard, (0.3, 0.7))
  loader = _loader(shard, skip=True, batch=3, workers=2)
  for _ in range(40):
    loader.next_local()
  assert loader.stats()["malformed"] == len(bad) == 2


def test_undecodable_records_count_once_each_however_often_drawn(shard, tmp_path):
  reader = array_record_module.ArrayRecordReader(shard)
  good = reader.read(list(range(RECORDS)))
  reader.close()
  path = str(tmp_path / "mixed.arrayrecord")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for i, record in enumerate(good):
    writer.write(b"\x93not a record" if i in (2, 5, 11) else record)
  writer.close()
  loader = _loader(path, skip=True)
  for _ in range(40):
    loader.next_local()
  assert loader.stats()["malformed"] == 3


@pytest.mark.parametrize("damage", ["empty", "half", "header"])
@pytest.mark.parametrize("skip", [False, True])
def test_unopenable_shard_is_named_with_the_fix_at_construction(shard, damage, skip):
  with open(shard, "rb") as f:
    data = f.read()
  data = {"empty": b"", "half": data[:len(data) // 2], "header": data[:100]}[damage]
  with open(shard, "wb") as f:
    f.write(data)
  what = "is empty" if damage == "empty" else rf"\({len(data)} bytes\) is truncated or corrupt"
  with pytest.raises(ShardError, match=rf"data shard {shard} {what}.*; remove it from "
                                       r"data\.shards or rebuild it"):
    _loader(shard, skip=skip)


# Export and score ----------------------------------------------------------------------------

TOKENS = [1, 5, 9, 200, 7, 3, 400, 12, 64, 301, 2, 11]


@pytest.fixture(scope="module")
def rope_run(tmp_path_factory) -> str:
  """A one-step tiny rope run (exports as a LlamaForCausalLM that transformers loads)."""
  run_dir = str(tmp_path_factory.mktemp("rope") / "run")
  cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), [
      "train.steps=1", "train.batch_size=8", "train.seq_len=32", "checkpoint.every=1",
      "model.init_std=0.1", "model.position_encoding=rope", f"train.run_dir={run_dir}"])
  os.makedirs(run_dir)
  dump_config(cfg, os.path.join(run_dir, "config.yaml"))
  train(cfg, print_fn=lambda *a, **k: None)
  return run_dir


def test_export_refuses_a_non_empty_directory(rope_run, tmp_path, capsys):
  out = tmp_path / "hf"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  with pytest.raises(ExportError, match=rf"{out} is not empty; .*--overwrite"):
    export_checkpoint(rope_run, str(out))
  assert cli.main(["export", rope_run, str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"stepaudio export: error: {out} is not empty"), err
  assert os.listdir(out) == ["notes.txt"]


def _stale_export(run: str, out: str) -> None:
  """What another export (and a Hugging Face download) leaves in `out`: many shards, a single
  model.safetensors with other weights, a tokenizer, and a file of the user's."""
  export_checkpoint(run, out, dtype="float32", max_shard_size="60KB")
  old = SafetensorsDir(out)
  plans = [TensorPlan(name, old.get(name).shape, np.dtype(np.float32),
                      lambda name=name: [old.get(name) * 0.5]) for name in old.keys()]
  write_file(os.path.join(out, "model.safetensors"), plans, {"format": "pt"})
  with open(os.path.join(out, "tokenizer.model"), "wb") as f:
    f.write(b"stale")
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write("my notes")


@pytest.mark.parametrize("damage,message", [
    ("truncate", r"model-00001-of-00001.safetensors: cut short: its tensors need \d+ bytes"),
    ("header", r"model-00001-of-00001.safetensors: not a safetensors file, or cut short"),
    ("config", r"config.json: not valid JSON"),
])
def test_import_of_a_damaged_export_is_one_error_line(rope_run, tmp_path, capsys, damage,
                                                      message):
  out = str(tmp_path / "hf")
  export_checkpoint(rope_run, out, dtype="float32")
  shard = os.path.join(out, "model-00001-of-00001.safetensors")
  if damage == "config":
    with open(os.path.join(out, "config.json"), "a") as f:
      f.write("}")
  else:
    with open(shard, "r+b") as f:
      f.truncate(os.path.getsize(shard) - 64 if damage == "truncate" else 5)
  tiny = os.path.join(REPO, "configs", "tiny.yaml")
  assert cli.main(["import", out, str(tmp_path / "run"), "--config", tiny]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("stepaudio import: error: "), err
  assert re.search(message, err[0]), err


def test_overwrite_replaces_only_the_model_files(rope_run, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  out = str(tmp_path / "hf")
  _stale_export(rope_run, out)
  assert len([f for f in os.listdir(out) if f.startswith("model-")]) > 2
  assert cli.main(["export", rope_run, out, "--dtype", "float32", "--overwrite"]) == 0
  assert sorted(os.listdir(out)) == [
      "README.md", "config.json", "generation_config.json", "model-00001-of-00001.safetensors",
      "model.safetensors.index.json", "tokenizer_config.json"]
  with open(os.path.join(out, "README.md")) as f:
    assert f.read() == "my notes"
  # transformers loads model.safetensors before an index: left there, it would win.
  model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = model(torch.tensor([TOKENS])).logits[0].numpy()
  np.testing.assert_allclose(theirs, score(rope_run, TOKENS), atol=1e-4)


EXPORT_WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
port, pid, run_dir, out_dir = sys.argv[1:5]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
from stepaudio_jax import cli
sys.exit(cli.main(["export", run_dir, out_dir, "--max-shard-size", "60KB", "--overwrite"]))
"""


def test_two_process_overwrite_clears_before_anyone_writes(rope_run, tmp_path):
  """Process 0 clears; process 1's shards (the same names as the stale ones) must survive."""
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  _stale_export(rope_run, multi)
  script = tmp_path / "worker.py"
  script.write_text(EXPORT_WORKER)
  port = str(portpicker.pick_unused_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, str(script), port, str(i), rope_run, multi],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=280)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  export_checkpoint(rope_run, single, max_shard_size="60KB")
  assert sorted(os.listdir(multi)) == sorted(os.listdir(single) + ["README.md"])
  for name in os.listdir(single):
    with open(os.path.join(multi, name), "rb") as a, open(os.path.join(single, name), "rb") as b:
      assert a.read() == b.read(), name


def test_score_out_of_range_is_one_error_line(rope_run, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "stepaudio_jax.cli", "score", rope_run, "--tokens", "1,5,512,-1",
       "--out", str(tmp_path / "logits.npy")],
      cwd=REPO, env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}, capture_output=True,
      text=True, timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  ours = [line for line in proc.stderr.splitlines() if line.startswith("stepaudio")]
  want = ("stepaudio score: error: --tokens [512, -1] are outside the vocabulary [0, 512) of "
          f"{rope_run}; pass ids below 512")
  assert ours == [want], proc.stderr[-3000:]
  assert not os.path.exists(tmp_path / "logits.npy")


# Launcher ------------------------------------------------------------------------------------

LAUNCH = ["configs/tiny.yaml", "train.seq_len=64", "train.log_every=1", "train.steps=1000",
          "train.peak_flops_per_device=1e12", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1",
          "checkpoint.every=1000"]


def _wait_for(path: str, text: str, proc: subprocess.Popen, seconds: float) -> None:
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline and proc.poll() is None:
    with open(path) as f:
      if text in f.read():
        return
    time.sleep(0.5)
  raise AssertionError(f"no {text!r} in {path} within {seconds} s (exit {proc.poll()})")


def _process_ids(script_pid: int) -> dict[int, int]:
  """STEPAUDIO_PROCESS_ID -> pid of the launcher's children."""
  with open(f"/proc/{script_pid}/task/{script_pid}/children") as f:
    children = [int(p) for p in f.read().split()]
  out = {}
  for pid in children:
    with open(f"/proc/{pid}/environ", "rb") as f:
      env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
    out[int(env[b"STEPAUDIO_PROCESS_ID"])] = pid
  return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the processes in /proc")
def test_launcher_stops_at_once_when_a_process_is_killed(tmp_path):
  """SIGKILL of process 1 mid-training: the script kills process 0 (which SIGTERM would send
  into a final collective save, stuck until JAX's heartbeat gives up, 70-80 s) and exits."""
  out, err = tmp_path / "out", tmp_path / "err"
  env = {**os.environ, "PYTHON": sys.executable, "PORT": str(portpicker.pick_unused_port())}
  with open(out, "w") as o, open(err, "w") as e:
    proc = subprocess.Popen(["bash", "launch/local_multiprocess.sh", "2", "2", *LAUNCH,
                             f"train.run_dir={tmp_path / 'run'}"], cwd=REPO, env=env,
                            stdout=o, stderr=e)
  try:
    _wait_for(str(out), "step 2/", proc, 240)
    victim = _process_ids(proc.pid)[1]
    os.kill(victim, signal.SIGKILL)
    rc = proc.wait(timeout=30)  # TimeoutExpired: the survivor is stuck in its final save
  finally:
    if proc.poll() is None:
      for pid in _process_ids(proc.pid).values():
        os.kill(pid, signal.SIGKILL)
      proc.kill()
  assert rc == 128 + signal.SIGKILL, rc  # process 1's status
  line = f"process 1 (pid {victim}) was killed by signal 9; killing the other processes"
  assert line in err.read_text(), err.read_text()[-3000:]


@pytest.mark.slow
def test_launcher_forwards_a_preemption_and_exits_0(tmp_path):
  """SIGTERM to the script reaches every process once: they stop after the same step, save it
  together and exit 0, and so does the script."""
  out, err, run = tmp_path / "out", tmp_path / "err", tmp_path / "run"
  env = {**os.environ, "PYTHON": sys.executable, "PORT": str(portpicker.pick_unused_port())}
  with open(out, "w") as o, open(err, "w") as e:
    proc = subprocess.Popen(["bash", "launch/local_multiprocess.sh", "2", "2", *LAUNCH,
                             f"train.run_dir={run}"], cwd=REPO, env=env, stdout=o, stderr=e)
  try:
    _wait_for(str(out), "step 2/", proc, 240)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  stdout = out.read_text()
  assert rc == 0, (stdout + err.read_text())[-3000:]
  (saved,) = os.listdir(run / "checkpoints")
  assert f"preempted (SIGTERM): saved step {saved} to {run / 'checkpoints'}" in stdout, stdout
