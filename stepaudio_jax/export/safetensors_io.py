"""Streaming safetensors: write sharded files one tensor at a time, read tensors lazily.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets
per tensor) and the raw little-endian bytes. Because every shape and dtype is known before any
data is read, the writer plans the shards and headers first and then streams each tensor's bytes
straight to disk, block by block along its leading axis (row-major, so the blocks are
consecutive bytes): the host holds one block, not the tensor, and hands freed memory back to the
OS after each tensor. Reading memory-maps the file, so a slice of a tensor touches only its own
pages. Plain numpy (bf16 via ml_dtypes): no torch, no pickle.
"""

import ctypes
import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from stepaudio_jax.export.orbax_reader import ExportError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {
    "F32": np.dtype(np.float32),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
}
CODES = {v: k for k, v in DTYPES.items()}


def _malloc_trim() -> Callable[[], object]:
  """glibc keeps freed buffers (one heap per tensorstore thread); malloc_trim returns them."""
  try:
    trim = ctypes.CDLL("libc.so.6").malloc_trim
  except (OSError, AttributeError):  # not glibc: its allocator is left alone
    return lambda: None
  return lambda: trim(0)


release_freed_memory = _malloc_trim()


def parse_size(text: str) -> int:
  """'5GB', '500MB', '64KiB' or a byte count -> bytes (HF's max_shard_size spelling)."""
  units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
  t = text.strip().upper()
  for unit, mult in units.items():
    if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
      return int(float(t[: -len(unit)]) * mult)
  if t.isdigit():
    return int(t)
  raise ValueError(f"max shard size {text!r} is not a size like 2GB, 500MB or 1048576")


@dataclasses.dataclass(frozen=True)
class TensorPlan:
  """One tensor to write: its name, shape, dtype, and a function producing its values.

  `blocks` yields the tensor in consecutive pieces along its leading axis (one piece: the whole
  tensor), each a full-rank array, so a large tensor never has to exist whole on the host.
  """

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  blocks: Callable[[], Iterable[np.ndarray]]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def plan_shards(tensors: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
  """Greedy, in order: a tensor starts a new shard when it would overflow the current one."""
  shards: list[list[TensorPlan]] = [[]]
  size = 0
  for t in tensors:
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  return shards


def shard_names(count: int) -> list[str]:
  return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(tensors: list[TensorPlan], metadata: dict[str, str]) -> bytes:
  head: dict = {"__metadata__": metadata}
  offset = 0
  for t in tensors:
    head[t.name] = {"dtype": CODES[t.dtype], "shape": list(t.shape),
                    "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  raw = json.dumps(head, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
  return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f, t: TensorPlan) -> None:
  rows = 0
  for block in t.blocks():
    block = np.ascontiguousarray(block)
    if block.dtype != t.dtype or block.ndim != len(t.shape) or block.shape[1:] != t.shape[1:]:
      raise ValueError(f"{t.name}: produced a block {block.dtype}{list(block.shape)} of a planned "
                       f"{t.dtype}{list(t.shape)}")
    rows += block.shape[0] if block.ndim else 1
    f.write(memoryview(block.reshape(-1).view(np.uint8)))
    del block
  if rows != (t.shape[0] if t.shape else 1):
    raise ValueError(f"{t.name}: produced {rows} rows, planned {t.dtype}{list(t.shape)}")


def write_file(path: str, tensors: list[TensorPlan], metadata: dict[str, str]) -> None:
  """Write one safetensors file, producing and writing one tensor (block) at a time."""
  tmp = path + ".partial"
  with open(tmp, "wb") as f:
    f.write(_header(tensors, metadata))
    for t in tensors:
      _write_tensor(f, t)
      release_freed_memory()
  os.replace(tmp, path)  # a file under its final name is always complete


def write_index(out_dir: str, shards: list[list[TensorPlan]], names: list[str]) -> None:
  weight_map = {t.name: fname for shard, fname in zip(shards, names) for t in shard}
  total = sum(t.nbytes for shard in shards for t in shard)
  with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


class SafetensorsFile:
  """Lazy reader of one safetensors file: tensors are views on a memory map."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} does not exist")
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      length = struct.unpack("<Q", head)[0] if len(head) == 8 else size
      if 8 + length > size:
        raise ExportError(f"{path}: not a safetensors file, or cut short (its header says "
                          f"{length} bytes, the file has {size}); copy or export it again")
      try:
        self.header = json.loads(f.read(length))
      except ValueError as e:
        raise ExportError(f"{path}: not a safetensors file (bad header: {e})") from None
    self.metadata = self.header.pop("__metadata__", {})
    self._data_start = 8 + length
    end = max((t["data_offsets"][1] for t in self.header.values()), default=0)
    if self._data_start + end > size:
      raise ExportError(f"{path}: cut short: its tensors need {self._data_start + end} bytes, the "
                        f"file has {size}; copy or export it again")
    self._map = np.memmap(path, dtype=np.uint8, mode="r")

  def keys(self) -> list[str]:
    return list(self.header)

  def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
    entry = self.header[name]
    if entry["dtype"] not in DTYPES:
      raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
    return tuple(entry["shape"]), DTYPES[entry["dtype"]]

  def get(self, name: str) -> np.ndarray:
    """A read-only view (nothing is read until it is indexed or copied)."""
    shape, dtype = self.info(name)
    begin, end = self.header[name]["data_offsets"]
    raw = self._map[self._data_start + begin: self._data_start + end]
    return raw.view(dtype).reshape(shape)


class SafetensorsDir:
  """All tensors of a Hugging Face model directory: one file, or shards listed by an index."""

  def __init__(self, directory: str):
    index = os.path.join(directory, INDEX_NAME)
    single = os.path.join(directory, SINGLE_NAME)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = {fname: SafetensorsFile(os.path.join(directory, fname))
               for fname in sorted(set(weight_map.values()))}
      self._where = {name: files[fname] for name, fname in weight_map.items()}
    elif os.path.isfile(single):
      f = SafetensorsFile(single)
      self._where = {name: f for name in f.keys()}
    else:
      raise FileNotFoundError(
          f"{directory} has neither {INDEX_NAME} nor {SINGLE_NAME}; point at the directory that "
          "holds the model's safetensors (pytorch_model.bin checkpoints are not read: convert "
          "them to safetensors first)"
      )

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def keys(self) -> Iterator[str]:
    return iter(self._where)

  def file_of(self, name: str) -> str:
    return self._where[name].path

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise KeyError(name)
    return self._where[name].get(name)
