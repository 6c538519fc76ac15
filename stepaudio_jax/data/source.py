"""The one interface every data source has, and the one place global batches are assembled.

A source yields this process's rows of successive global batches (process p of P holds global
rows [p * B/P, (p + 1) * B/P)), so a global batch never depends on the process count. Its
position is checkpointed with the model: `get_state()` is what the checkpoint stores (None when
the step alone says where the source is), `restore(step, state)` puts it back.
"""

import abc

import jax
import numpy as np

from stepaudio_jax.config import ConfigError


class LoaderStateError(RuntimeError):
  """A saved source state that cannot continue on this topology or config."""


def process_rows(global_batch: int) -> range:
  """The global rows this process loads."""
  procs = jax.process_count()
  if global_batch % procs:
    raise ConfigError(f"train.batch_size={global_batch} is not divisible by {procs} processes "
                      "(each loads its own rows); make it a multiple of the process count")
  per = global_batch // procs
  return range(jax.process_index() * per, (jax.process_index() + 1) * per)


class BatchSource(abc.ABC):
  @abc.abstractmethod
  def next_local(self) -> dict[str, np.ndarray]:
    """This process's rows of the next global batch."""

  def stats(self) -> dict[str, float]:
    """Cumulative counters of this process (logged as data/<name>)."""
    return {}

  def get_state(self) -> dict | None:
    """JSON-able position (a collective when the source is multi-process), or None when the
    step alone determines it."""
    return None

  @abc.abstractmethod
  def restore(self, step: int, state: dict | None) -> None:
    """Continue as a source that has produced `step` batches (state: what get_state saved)."""

  @abc.abstractmethod
  def restart(self, at_step: int) -> None:
    """Start over from the first batch, as the data of step `at_step` is mixed (eval)."""

  def close(self) -> None:
    pass


def next_global_batch(source: BatchSource, fields: dict[str, jax.ShapeDtypeStruct]
                      ) -> dict[str, jax.Array]:
  """The next global batch; every process contributes its rows. `fields` are the task's
  declared arrays (global shape, dtype, sharding); a source that yields anything else is an
  error naming the field."""
  local = source.next_local()
  if set(local) != set(fields):
    raise ValueError(f"the data source yields fields {sorted(local)} but the task declares "
                     f"{sorted(fields)}")
  out = {}
  for name, want in fields.items():
    got = local[name]
    rows = want.shape[0] // jax.process_count()
    if got.shape != (rows,) + tuple(want.shape[1:]) or got.dtype != want.dtype:
      raise ValueError(
          f"batch field {name!r}: the data source gives {got.dtype}{list(got.shape)} per "
          f"process, the task declares {want.dtype}{list(want.shape)} globally "
          f"({jax.process_count()} processes)")
    out[name] = jax.make_array_from_process_local_data(want.sharding, got, want.shape)
  return out
