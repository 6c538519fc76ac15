"""`stepaudio export`: a run's model -> a Hugging Face model directory, tensor by tensor.

What is exported is what the run delivers (its task's first deliverable: the LM of a
pretraining or SFT run, a PPO run's policy, a reward run's backbone and scalar head, a flow
model, a vocoder generator), or another of its models by name (`--model critic`). Step1 LMs
and reward models go tensor by tensor as below; the speech decoder's models are small and go
whole, in the layout of export/speech_layout.py.

Shapes and dtypes come from the run's config, so the shard plan and every file header are known
before any weight is read. Each tensor is then read from the checkpoint in blocks of at most
BLOCK_BYTES (of one layer of a stacked array, along the axis that becomes its public rows),
transposed to the PyTorch layout, cast and appended to its file, and dropped. Peak host memory is
one decoded stored chunk plus one block, whatever the model size; a stacked array saved from a
single device is one chunk holding every layer, so there the chunk term is that whole array.

Several processes (a multi-host job) split the shard files between them: process i writes the
shards i, i + P, ...; process 0 also writes the JSON files. Every process reads the checkpoint
from the shared filesystem the run saved to, so nothing has to be gathered.

The output directory must be empty: files of another export left beside the new ones would be
loaded with them (transformers prefers a stale model.safetensors to the new shards). With
`overwrite`, process 0 first removes what an export writes (`OUTPUTS`) and nothing else, and
every process waits for that before writing.
"""

import dataclasses
import glob
import json
import os
import shutil

import ml_dtypes
import numpy as np

from stepaudio_jax.export import hf_remote
from stepaudio_jax.export import safetensors_io as st
from stepaudio_jax.export import speech_layout
from stepaudio_jax.export import step1_layout as layout
from stepaudio_jax.export.orbax_reader import ExportError, ModelReader

OUT_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
# What an export writes (or a Hugging Face model directory holds in its place): all of it is
# replaced by --overwrite, since a leftover would be loaded as part of the new model.
OUTPUTS = ("model-*-of-*.safetensors", st.SINGLE_NAME, st.INDEX_NAME, "config.json",
           "generation_config.json", "tokenizer_config.json", "tokenizer.model", *hf_remote.FILES)
BLOCK_BYTES = 16 * 2**20  # of stored values read at once: a larger tensor is read in pieces


@dataclasses.dataclass(frozen=True)
class ExportSummary:
  out_dir: str
  step: int
  model: str  # the run's model that was exported (its deliverable's name)
  architecture: str
  files: list[str]  # the shard files this process wrote
  num_tensors: int
  total_bytes: int
  largest_tensor_bytes: int


def check_shapes(reader: ModelReader, cfg, maps: list[layout.TensorMap]) -> None:
  """Fail before writing anything if the checkpoint does not hold the config's model."""
  for m in maps:
    want = layout.stacked_shape(cfg, m)
    got = reader.shape(m.ours)
    if got != want:
      raise ExportError(
          f"{reader.checkpoint.state_dir}: {'.'.join(reader.path(m.ours))} has shape "
          f"{list(got)} but {os.path.join(reader.checkpoint.run_dir, 'config.yaml')} implies "
          f"{list(want)}; the config does not belong to this checkpoint (pass the run "
          "directory that wrote it)"
      )


def public_blocks(reader: ModelReader, m: layout.TensorMap, dtype: np.dtype):
  """m's public tensor as consecutive row blocks, each read, transposed and cast on its own.

  A block is a range along m.row_axis of our array; when the stored chunks split that axis the
  blocks are whole chunks, so no chunk is decoded twice.
  """
  units = m.our_shape[m.row_axis]
  unit_bytes = reader.dtype(m.ours).itemsize * int(np.prod(m.our_shape)) // units
  step = min(units, max(1, BLOCK_BYTES // unit_bytes))
  chunk = reader.chunk_shape(m.ours)[len(m.index) + m.row_axis]
  if chunk < step:
    step -= step % chunk
  for start in range(0, units, step):
    index = m.index + (slice(None),) * m.row_axis + (slice(start, min(start + step, units)),)
    yield np.ascontiguousarray(m.to_public(reader.read(m.ours, index)), dtype=dtype)


def tensor_plans(reader: ModelReader, dtype: np.dtype) -> list[st.TensorPlan]:
  """The public tensors of the reader's model, each to be read when its file is written."""
  cfg, kind = reader.config, reader.deliverable.kind
  if kind in ("flow", "vocoder"):
    tensors = speech_layout.public_tensors(reader.tree())
    return [st.TensorPlan(name, a.shape, dtype, lambda a=a: [a.astype(dtype)])
            for name, a in tensors.items()]
  maps = layout.reward_tensor_maps(cfg.model) if kind == "reward" else \
      layout.tensor_maps(cfg.model)
  check_shapes(reader, cfg.model, maps)
  return [st.TensorPlan(m.name, m.public_shape, dtype,
                        lambda m=m: public_blocks(reader, m, dtype)) for m in maps]


def model_configs(reader: ModelReader, dtype: str, has_tokenizer: bool) -> dict[str, dict]:
  """The JSON files of an export of the reader's model, by file name."""
  cfg, kind = reader.config, reader.deliverable.kind
  if kind in ("flow", "vocoder"):
    return {"config.json": speech_layout.hf_config(kind, cfg, dtype)}
  out = {"config.json": layout.hf_config(cfg.model, cfg.tokens, dtype, kind),
         "tokenizer_config.json": layout.tokenizer_config(cfg.model, cfg.tokens, has_tokenizer)}
  if kind == "step1":
    out["generation_config.json"] = layout.generation_config(cfg.tokens)
  return out


def _prepare_out_dir(out_dir: str, overwrite: bool, clear: bool) -> None:
  """Create out_dir or check that it is empty; with `overwrite`, `clear` removes OUTPUTS."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ExportError(f"{out_dir} is a file; pass a directory to export into")
  os.makedirs(out_dir, exist_ok=True)
  if not overwrite:
    if os.listdir(out_dir):
      raise ExportError(f"{out_dir} is not empty; export into a new directory, or pass "
                        "--overwrite to replace the model files there (other files are kept)")
  elif clear:
    for pattern in OUTPUTS:
      for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
        os.remove(path)


def _write_json(path: str, obj: dict) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def export_checkpoint(
    checkpoint: str,
    out_dir: str,
    *,
    model: str = "",
    dtype: str = "bfloat16",
    max_shard_size: str = "5GB",
    tokenizer_model: str = "",
    process_index: int = 0,
    process_count: int = 1,
    overwrite: bool = False,
) -> ExportSummary:
  """Write out_dir (safetensors shards + index, config.json, and for an LM its generation and
  tokenizer config) from the run's deliverable, or its model named `model`.

  out_dir must be empty unless `overwrite`. With several processes this is a collective: every
  process calls it, and none writes before process 0 has cleared out_dir.
  """
  if dtype not in OUT_DTYPES:
    raise ExportError(f"--dtype {dtype!r}: choose one of {sorted(OUT_DTYPES)}")
  if tokenizer_model and not os.path.isfile(tokenizer_model):
    raise ExportError(f"--tokenizer {tokenizer_model}: no such file (a sentencepiece .model)")
  reader = ModelReader(checkpoint, model)
  plans = tensor_plans(reader, OUT_DTYPES[dtype])
  shards = st.plan_shards(plans, st.parse_size(max_shard_size))
  names = st.shard_names(len(shards))
  _prepare_out_dir(out_dir, overwrite, clear=process_index == 0)
  if process_count > 1:  # every process has checked out_dir before any writes into it
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("stepaudio export: out_dir ready")
  written = []
  for i, (shard, name) in enumerate(zip(shards, names)):
    if i % process_count == process_index:
      st.write_file(os.path.join(out_dir, name), shard, {"format": "pt"})
      written.append(name)
  if process_index == 0:
    st.write_index(out_dir, shards, names)
    for name, content in model_configs(reader, dtype, bool(tokenizer_model)).items():
      _write_json(os.path.join(out_dir, name), content)
    hf_remote.copy_remote_code(out_dir)  # the modules config.json's auto_map names
    if tokenizer_model:
      shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
  return ExportSummary(
      out_dir=out_dir, step=reader.checkpoint.step, model=reader.name,
      architecture=model_configs(reader, dtype, False)["config.json"]["architectures"][0],
      files=written,
      num_tensors=len(plans), total_bytes=sum(p.nbytes for p in plans),
      largest_tensor_bytes=max(p.nbytes for p in plans),
  )
