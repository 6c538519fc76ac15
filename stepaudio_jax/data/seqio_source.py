"""A registered seqio Task as the loader's text component, so existing text corpora train as is.

`data.seqio_task` names the Task (`data.seqio_module` is imported first to register it); one
split (`data.seqio_split`) is read once, unshuffled and untruncated, and its `data.seqio_feature`
("targets") becomes `Example(task="text")`s that the loader shuffles, mixes, templates and packs
like shard records. Token ids (`data.seqio_ids`):

  retokenize (default)  the Task's ids are decoded with its vocabulary and encoded with the
                        model's tokenizer (data.tokenizer_model): right whatever vocabulary the
                        Task was built with (e.g. T5's), at the cost of a decode/encode round trip.
  task                  the Task's ids are kept (its trailing EOS is dropped: the template adds
                        ours). Only right when the Task's vocabulary IS the model's sentencepiece
                        model; ids at or above tokens.text_vocab_size fail record validation.

A string feature (a Task without a tokenize preprocessor) is encoded with our tokenizer in either
mode. The split is held in memory as encoded records, so batches stay a pure function of the
step and resume is exact; for corpora larger than host memory, write shards once instead:
`records.write_shard(path, seqio_examples(...))`, and list them in data.shards.text.
"""

import importlib
from collections.abc import Iterator

import numpy as np

from stepaudio_jax.data import records
from stepaudio_jax.data.tokenizer import Tokenizer

_EMPTY = np.zeros(0, np.int32)


def _import_seqio():
  """seqio, with TensorFlow kept off the accelerators (it would reserve their memory)."""
  try:
    import seqio
    import tensorflow as tf
  except ImportError as e:
    raise ImportError("data.seqio_task needs the seqio extra: "
                      "pip install 'seqio==0.0.20' 'sentencepiece==0.2.1'") from e
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow already ran: its devices were set by the first call
    pass
  return seqio


def _text_ids(value, vocab, ids: str, tokenizer: Tokenizer) -> np.ndarray:
  """One feature value as model text ids, by the `ids` mode of the module docstring."""
  if isinstance(value, bytes):  # untokenized feature
    return np.asarray(tokenizer.encode(value.decode("utf-8")), np.int32)
  value = np.asarray(value).reshape(-1)
  if vocab.eos_id is not None and value.size and value[-1] == vocab.eos_id:
    value = value[:-1]
  if ids == "task":
    return value.astype(np.int32)
  text = vocab.decode(value.tolist())
  if not isinstance(text, str):
    raise ValueError(f"vocabulary {type(vocab).__name__} does not decode ids to text; "
                     "use data.seqio_ids: task")
  return np.asarray(tokenizer.encode(text), np.int32)


def seqio_examples(task_name: str, split: str, feature: str, ids: str, tokenizer: Tokenizer,
                   module: str = "") -> Iterator[records.Example]:
  """The split's examples in the Task's order as text Examples (empty ones are skipped)."""
  seqio = _import_seqio()
  if module:
    importlib.import_module(module)
  task = seqio.TaskRegistry.get(task_name)
  if feature not in task.output_features:
    raise ValueError(f"seqio task {task_name!r} has no output feature {feature!r}; it has "
                     f"{sorted(task.output_features)}")
  vocab = task.output_features[feature].vocabulary
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                        use_cached=task.requires_caching)
  for ex in ds.as_numpy_iterator():
    text = _text_ids(ex[feature], vocab, ids, tokenizer)
    if text.size:
      yield records.Example("text", [text], [_EMPTY], [_EMPTY], None, {"source": task_name})


class SeqioTextSource:
  """Random access over a seqio Task split, read into memory once as encoded records (the
  loader's map step decodes and validates them like shard records)."""

  def __init__(self, task_name: str, split: str, feature: str, ids: str, tokenizer: Tokenizer,
               module: str = ""):
    self.where = f"seqio task {task_name} split {split}"
    self._records = [records.encode(ex) for ex in
                     seqio_examples(task_name, split, feature, ids, tokenizer, module)]
    if not self._records:
      raise ValueError(f"{self.where} holds no non-empty {feature!r} examples")

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> tuple[str, bytes]:
    return f"{self.where} example {index}", self._records[index]
