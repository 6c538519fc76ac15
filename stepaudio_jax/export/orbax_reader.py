"""Read single arrays (or slices of them) out of a trainer checkpoint, never the whole state.

A checkpoint step is RUN_DIR/checkpoints/<step>/state, an Orbax PyTree checkpoint (OCDBT +
zarr). Orbax's own restore materialises the requested tree at once; here each array is opened
with tensorstore and only the requested index is read, so exporting a model needs host memory
for one decoded stored chunk (Orbax writes one chunk per device shard) plus the block being
converted, not for the model. Chunks are decoded whole (zstd): a stacked [L, ...] array saved
from one device is one chunk, so reading one of its layers decodes all L. Works on checkpoints
written by any number of processes (one OCDBT database per process, all under the same root).
"""

import itertools
import json
import os

import numpy as np
import tensorstore as ts

from stepaudio_jax.config import ConfigError, RunConfig
from stepaudio_jax.tasks.base import Deliverable
from stepaudio_jax.tasks.registry import deliverable, load_config
from stepaudio_jax.training.checkpoint_format import refusal


class ExportError(ValueError):
  """Bad input to export/import; the message names the file and the fix."""


def _complete_steps(ckpt_dir: str) -> list[int]:
  steps = []
  for name in os.listdir(ckpt_dir):
    state = os.path.join(ckpt_dir, name, "state")
    if name.isdigit() and os.path.isfile(os.path.join(state, "_METADATA")):
      steps.append(int(name))
  return sorted(steps)


def resolve_step_dir(path: str) -> tuple[str, str]:
  """(run_dir, step_dir) for a run directory (newest complete step) or a step directory."""
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, "state", "_METADATA")):
    return os.path.dirname(os.path.dirname(path)), path
  ckpt_dir = os.path.join(path, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise ExportError(
        f"{path} is neither a run directory (no {ckpt_dir}) nor a checkpoint step directory "
        "(no state/_METADATA); pass RUN_DIR or RUN_DIR/checkpoints/<step>"
    )
  steps = _complete_steps(ckpt_dir)
  if not steps:
    raise ExportError(f"{ckpt_dir} holds no complete checkpoint step (no <step>/state/_METADATA)")
  return path, os.path.join(ckpt_dir, str(steps[-1]))


def load_run_config(run_dir: str) -> RunConfig:
  path = os.path.join(run_dir, "config.yaml")
  if not os.path.isfile(path):
    raise ExportError(
        f"{path} does not exist: the trainer writes it next to checkpoints/; copy the run's "
        "resolved config there (stepaudio show-config CONFIG > config.yaml)"
    )
  return load_config(path)


def _check_layout(step_dir: str) -> None:
  """Refuse a step the trainer of another version wrote. A step with no data item (a state
  saved by plain Orbax) is read as stored: its array paths say whether it holds our models."""
  path = os.path.join(step_dir, "data", "metadata")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    refused = refusal(step_dir, json.load(f))
  if refused:
    raise ExportError(refused)


class CheckpointReader:
  """Arrays of one checkpoint step by tree path, e.g. ('params', 'model', 'lm', 'layers', 'wq')."""

  def __init__(self, path: str):
    self.run_dir, self.step_dir = resolve_step_dir(path)
    _check_layout(self.step_dir)
    self.state_dir = os.path.join(self.step_dir, "state")
    with open(os.path.join(self.state_dir, "_METADATA")) as f:
      meta = json.load(f)
    self._driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    self._ocdbt = meta.get("use_ocdbt", True)
    self.paths = [
        tuple(k["key"] for k in entry["key_metadata"])
        for entry in meta["tree_metadata"].values()
        if entry["value_metadata"]["value_type"] == "jax.Array"
    ]
    self._open: dict[tuple, ts.TensorStore] = {}
    # One context for all arrays, no cache: a read decodes its chunk, copies the slice out and
    # lets the chunk go. One decoding thread: fewer per-thread malloc heaps holding freed chunks.
    self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0},
                                "data_copy_concurrency": {"limit": 1}})

  @property
  def step(self) -> int:
    return int(os.path.basename(self.step_dir))

  def _store(self, path: tuple[str, ...]) -> ts.TensorStore:
    if path not in self._open:
      if path not in self.paths:
        raise ExportError(
            f"{self.state_dir} has no array {'.'.join(path)}; it is not a checkpoint of this "
            "model (stored arrays start with "
            f"{sorted({'.'.join(p[:2]) for p in self.paths})})"
        )
      name = ".".join(path)
      if self._ocdbt:
        kvstore = {"driver": "ocdbt", "base": f"file://{self.state_dir}", "path": name}
      else:
        kvstore = {"driver": "file", "path": os.path.join(self.state_dir, name)}
      spec = {"driver": self._driver, "kvstore": kvstore}
      self._open[path] = ts.open(spec, open=True, read=True, context=self._context).result()
    return self._open[path]

  def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(self._store(path).shape)

  def chunk_shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
    """The stored chunk grid: a read decodes every chunk it touches, whole."""
    return tuple(self._store(path).chunk_layout.read_chunk.shape)

  def dtype(self, path: tuple[str, ...]) -> np.dtype:
    return np.dtype(self._store(path).dtype.numpy_dtype)

  def read(self, path: tuple[str, ...], index=()) -> np.ndarray:
    """The array at `path`, or only `index` of it (e.g. one layer of a stacked parameter).

    Read one stored chunk at a time: a single read over many chunks fetches all of them at once,
    so it would hold every touched chunk (compressed) in memory together.
    """
    view = self._store(path)[index]
    grid = view.chunk_layout
    pieces = []  # per dimension, the chunk-aligned intervals covering the view
    for lo, hi, size, origin in zip(view.domain.inclusive_min, view.domain.exclusive_max,
                                    grid.read_chunk.shape, grid.grid_origin):
      cuts = range(origin + (lo - origin) // size * size + size, hi, size)
      edges = [lo, *cuts, hi]
      pieces.append([slice(a, b) for a, b in zip(edges, edges[1:])])
    out = np.empty(view.shape, view.dtype.numpy_dtype)
    for part in itertools.product(*pieces):
      local = tuple(slice(p.start - lo, p.stop - lo)
                    for p, lo in zip(part, view.domain.inclusive_min))
      out[local] = view[part].read().result()
    return out


class ModelReader:
  """The arrays of one model of a run, by their path inside the model: what the run delivers
  (its task's first deliverable: a PPO run's policy, a reward run's reward model, ...) or
  another of its models by name. A model's arrays may be trainable or frozen in the state."""

  def __init__(self, checkpoint: str, name: str = "", kind: str = ""):
    self.checkpoint = CheckpointReader(checkpoint)
    self.config = load_run_config(self.checkpoint.run_dir)
    try:
      self.name, self.model = deliverable(self.config.task, name, self.checkpoint.run_dir)
    except ConfigError as e:
      raise ExportError(str(e)) from None
    if kind and self.model.kind != kind:
      raise ExportError(f"{self.checkpoint.run_dir}: model {self.name!r} of this "
                        f"{self.config.task} run is a {self.model.kind} model, not a {kind} "
                        "model; choose another with --model")
    roots = [(tree, self.model.group, *self.model.within) for tree in ("params", "frozen")]
    self._stored = {p[len(r):]: p for p in self.checkpoint.paths for r in roots
                    if p[:len(r)] == r}
    if not self._stored:
      raise ExportError(f"{self.checkpoint.state_dir} holds no arrays of model {self.name!r} "
                        f"(at {'.'.join(roots[0][1:])}); it is not a checkpoint of this run's "
                        f"{self.config.task} task")

  @property
  def deliverable(self) -> Deliverable:
    return self.model

  def path(self, inner: tuple[str, ...]) -> tuple[str, ...]:
    if inner not in self._stored:
      raise ExportError(f"{self.checkpoint.state_dir}: model {self.name!r} has no array "
                        f"{'.'.join(inner)}; it is not a checkpoint of this model")
    return self._stored[inner]

  @property
  def inner_paths(self) -> list[tuple[str, ...]]:
    return sorted(self._stored)

  def shape(self, inner: tuple[str, ...]) -> tuple[int, ...]:
    return self.checkpoint.shape(self.path(inner))

  def chunk_shape(self, inner: tuple[str, ...]) -> tuple[int, ...]:
    return self.checkpoint.chunk_shape(self.path(inner))

  def dtype(self, inner: tuple[str, ...]) -> np.dtype:
    return self.checkpoint.dtype(self.path(inner))

  def read(self, inner: tuple[str, ...], index=()) -> np.ndarray:
    return self.checkpoint.read(self.path(inner), index)

  def tree(self) -> dict:
    """Every array of the model as a nested dict (for small models: the speech decoder)."""
    out: dict = {}
    for inner in self.inner_paths:
      node = out
      for k in inner[:-1]:
        node = node.setdefault(k, {})
      node[inner[-1]] = self.read(inner)
    return out
