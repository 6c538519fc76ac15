"""The on-disk example record: one msgpack map per ArrayRecord entry, no pickle.

The offline pipeline writes `Example`s with `write_shard`; the loader reads them back with
`decode` in its map step and `validate`s them, so a bad record is reported by shard and index
instead of surfacing later as a shape error inside the model. A record whose bytes fail the
shard's checksum is a `RecordError` too; a shard that cannot be opened at all is a `ShardError`.

Wire format (msgpack map):
  {"v": 1, "task": str, "text": [arr...], "linguistic": [arr...], "semantic": [arr...],
   "image": arr | None, "metadata": {str: str | int | float}}
  arr = {"dtype": numpy dtype str, "shape": [int...], "data": raw little-endian bytes}
"""

import dataclasses
from collections.abc import Iterable, Sequence

import msgpack
import numpy as np

from stepaudio_jax.config.data import TASKS
from stepaudio_jax.config.model import TokenLayout

FORMAT_VERSION = 1
# Preference pairs (data/pairs.py) are records too, read by the reward model and PPO, not mixed
# into pretraining rows.
PREFERENCE = "preference"


class RecordError(ValueError):
  """A record that cannot be read or decoded or breaks the contract; the reader adds shard and
  index."""


class ShardError(ValueError):
  """A shard that cannot be opened (empty, truncated, corrupt footer); the message names it."""


@dataclasses.dataclass
class Example:
  """One training example before templating.

  Chunks: for "audio_text_interleaved" chunk i pairs text[i] with audio (linguistic[i],
  semantic[i]). "aqta" holds the dialogue's turns, human and assistant alternately: text-only
  history turns, then the spoken question (audio only), then the answer (text only). "tts" has
  one chunk (text, its speech) or two: a voice prompt (prompt text, prompt speech), then the
  target. Every other task has exactly one chunk (empty arrays where absent).
  """

  task: str
  text: list[np.ndarray]
  linguistic: list[np.ndarray]
  semantic: list[np.ndarray]
  image: np.ndarray | None = None
  metadata: dict[str, str | int | float] = dataclasses.field(default_factory=dict)


def _pack_array(a: np.ndarray) -> dict:
  a = np.ascontiguousarray(a)
  return {"dtype": a.dtype.newbyteorder("<").str, "shape": list(a.shape),
          "data": a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()}


def _unpack_array(d: dict) -> np.ndarray:
  if not isinstance(d, dict) or set(d) != {"dtype", "shape", "data"}:
    raise RecordError(f"array entry must be a map with dtype, shape, data; got {type(d).__name__}")
  try:
    dtype = np.dtype(d["dtype"])
    if dtype.hasobject:
      raise RecordError(f"object dtype {d['dtype']!r} is not allowed")
    arr = np.frombuffer(d["data"], dtype=dtype).reshape(d["shape"])
  except (TypeError, ValueError) as e:
    raise RecordError(f"bad array entry: {e}") from e
  return arr.astype(dtype.newbyteorder("="))


def encode(example: Example) -> bytes:
  """Serialise an example (not validated here: call `validate` first to fail at write time)."""
  return msgpack.packb({
      "v": FORMAT_VERSION,
      "task": example.task,
      "text": [_pack_array(a) for a in example.text],
      "linguistic": [_pack_array(a) for a in example.linguistic],
      "semantic": [_pack_array(a) for a in example.semantic],
      "image": None if example.image is None else _pack_array(example.image),
      "metadata": dict(example.metadata),
  }, use_bin_type=True)


def decode(data: bytes) -> Example:
  """Parse one record; any structural problem raises `RecordError`."""
  try:
    m = msgpack.unpackb(data, raw=False, strict_map_key=True)
  except Exception as e:  # msgpack raises several unrelated exception types
    raise RecordError(f"not a msgpack record: {type(e).__name__}: {e}") from e
  if not isinstance(m, dict):
    raise RecordError(f"record must be a msgpack map, got {type(m).__name__}")
  want = {"v", "task", "text", "linguistic", "semantic", "image", "metadata"}
  if set(m) != want:
    raise RecordError(f"record keys {sorted(m)} != {sorted(want)}")
  if m["v"] != FORMAT_VERSION:
    raise RecordError(f"record format version {m['v']!r}, this reader knows {FORMAT_VERSION}")
  for k in ("text", "linguistic", "semantic"):
    if not isinstance(m[k], list):
      raise RecordError(f"{k} must be a list of arrays")
  if not isinstance(m["metadata"], dict):
    raise RecordError("metadata must be a map")
  return Example(
      task=m["task"],
      text=[_unpack_array(a) for a in m["text"]],
      linguistic=[_unpack_array(a) for a in m["linguistic"]],
      semantic=[_unpack_array(a) for a in m["semantic"]],
      image=None if m["image"] is None else _unpack_array(m["image"]),
      metadata=m["metadata"],
  )


def task_of(example: Example) -> str:
  """The task an example trains: records written before "aqta" existed store AQTA pairs as
  audio_text_interleaved with metadata kind="aqta" (the committed corpus does), and are AQTA."""
  if example.task == "audio_text_interleaved" and example.metadata.get("kind") == "aqta":
    return "aqta"
  return example.task


def _check_aqta(example: Example) -> None:
  n = len(example.text)
  if n < 2 or n % 2:
    raise RecordError(f"aqta needs an even number of chunks >= 2 (turns human, assistant, ..., "
                      f"question, answer), got {n}")
  for i, (text, ling, sem) in enumerate(zip(example.text, example.linguistic, example.semantic)):
    if i == n - 2:
      if text.size or not (ling.size or sem.size):
        raise RecordError(f"aqta chunk {i} is the spoken question: audio and no text")
    elif ling.size or sem.size:
      raise RecordError(f"aqta chunk {i} is a text turn but holds audio")
  if not example.text[-1].size:
    raise RecordError("aqta's last chunk (the answer) has no text")


def _check_preference(example: Example) -> None:
  n = len(example.text)
  if n < 3 or (n - 3) % 2:
    raise RecordError(f"preference needs text history turns in pairs, then question, chosen, "
                      f"rejected; got {n} chunks")
  for i, (text, ling, sem) in enumerate(zip(example.text, example.linguistic, example.semantic)):
    spoken = bool(ling.size or sem.size)
    if i == n - 3:
      if spoken == bool(text.size):
        raise RecordError(f"preference chunk {i} is the question: text or audio, not both/none")
    elif spoken or not text.size:
      raise RecordError(f"preference chunk {i} is a text turn or answer: text and no audio")


def _check_codes(name: str, arrays: Sequence[np.ndarray], limit: int | None) -> None:
  for i, a in enumerate(arrays):
    if not isinstance(a, np.ndarray) or a.dtype != np.int32 or a.ndim != 1:
      got = f"{a.dtype}[{a.ndim}d]" if isinstance(a, np.ndarray) else type(a).__name__
      raise RecordError(f"{name}[{i}] must be a 1-d int32 array, got {got}")
    if a.size and a.min() < 0:
      raise RecordError(f"{name}[{i}] has negative id {int(a.min())}")
    if limit is not None and a.size and a.max() >= limit:
      raise RecordError(f"{name}[{i}] has id {int(a.max())} >= {limit}")


def validate(example: Example, layout: TokenLayout | None = None) -> Example:
  """Check task, dtypes, ranks, chunk counts, code ranges (with a layout) and the image."""
  if example.task not in TASKS + (PREFERENCE,):
    raise RecordError(f"unknown task {example.task!r}; expected one of {TASKS + (PREFERENCE,)}")
  n = len(example.text)
  if not (len(example.linguistic) == len(example.semantic) == n):
    raise RecordError(f"chunk counts differ: text {n}, linguistic {len(example.linguistic)}, "
                      f"semantic {len(example.semantic)}")
  if example.task in ("audio_text_interleaved", "aqta"):
    if n < 1:
      raise RecordError(f"{example.task} needs at least one chunk")
  elif example.task == PREFERENCE:
    _check_preference(example)
  elif example.task == "tts":
    if n not in (1, 2):
      raise RecordError(f"tts has one chunk (target) or two (prompt, target), got {n}")
  elif n != 1:
    raise RecordError(f"task {example.task!r} has exactly one chunk, got {n}")
  _check_codes("text", example.text, layout and layout.text_vocab_size)
  _check_codes("linguistic", example.linguistic, layout and layout.linguistic_codes)
  _check_codes("semantic", example.semantic, layout and layout.semantic_codes)
  if task_of(example) == "aqta":
    _check_aqta(example)
  img = example.image
  if example.task == "image_text":
    if img is None:
      raise RecordError("image_text example has no image")
  if img is not None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
      got = f"{img.dtype}{list(img.shape)}" if isinstance(img, np.ndarray) else type(img).__name__
      raise RecordError(f"image must be uint8 [H, W, 3], got {got}")
  for k, v in example.metadata.items():
    if not isinstance(k, str) or not isinstance(v, (str, int, float)) or isinstance(v, bool):
      raise RecordError(f"metadata {k!r}: values must be str, int or float, got {type(v).__name__}")
  return example


def write_shard(path: str, examples: Iterable[Example]) -> int:
  """Write validated examples to one ArrayRecord shard; returns how many were written."""
  from array_record.python import array_record_module  # heavy import, writers only

  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  count = 0
  try:
    for ex in examples:
      writer.write(encode(validate(ex)))
      count += 1
  finally:
    writer.close()
  return count


def decode_checked(data: bytes, layout: TokenLayout | None, where: str) -> Example:
  """decode + validate, with `where` (shard path and record index) prefixed to any error."""
  try:
    return validate(decode(data), layout)
  except RecordError as e:
    raise RecordError(f"{where}: {e}") from e
