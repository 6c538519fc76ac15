"""Orbax checkpoints of the train state and the data source's position, restorable onto any mesh.

Layout: RUN_DIR/checkpoints/<step>/{state,data}. `state` is the TrainState (params, frozen and
opt_state keyed by model name); `data` is JSON: {"layout": 2, "step", "train_steps",
"iterator"?, "checksums"} with the source's position and, per array, the sum of its bits as
uint32 words (mod 2^32), computed on device before the write and compared after every restore:
a flipped bit anywhere in the stored data changes it, so silent corruption is refused. Orbax writes each step into a temporary directory and
renames it when complete, so a step directory is either whole or absent; leftover temporary
directories (a save cut short) are reported and never read. Restore takes abstract targets that
carry the current mesh's shardings, which is what lets a run saved on one mesh resume on another.
A step whose `data` has another layout number (or none) is refused before its state is read.
"""

import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from stepaudio_jax.config import ConfigError
from stepaudio_jax.config.loading import read_yaml
from stepaudio_jax.config.training import CheckpointConfig
from stepaudio_jax.tasks.base import Deliverable
from stepaudio_jax.tasks.registry import deliverable
from stepaudio_jax.training.checkpoint_format import LAYOUT, refusal

log = logging.getLogger(__name__)
# What reading a damaged, partial or mismatched checkpoint raises, found by damaging each file
# of a step (flipped bytes, truncated, emptied, deleted): TensorStore's DATA_LOSS / OUT_OF_RANGE
# / NOT_FOUND and Orbax's tree mismatches are ValueErrors, bad metadata JSON a JSONDecodeError
# or UnicodeDecodeError (ValueErrors too), a missing item file a FileNotFoundError. Anything else
# is a bug and propagates as itself.
UNREADABLE = (ValueError, OSError)
# What a failed write raises (TensorStore's RESOURCE_EXHAUSTED for a full disk is a ValueError;
# Orbax's own file operations raise OSError).
SAVE_FAILED = (ValueError, OSError)


class CheckpointError(RuntimeError):
  """A checkpoint that exists but cannot be used; training stops rather than start over."""


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree,
  )


def _bits_sum(x: jax.Array) -> jax.Array:
  word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  bits = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(x, word)
  return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


@functools.lru_cache(maxsize=8)
def _bits_sums(shardings: tuple) -> Callable[[list[jax.Array]], list[jax.Array]]:
  """One program for every array of a state (a program per array compiles dozens of times at
  the first save); kept per output shardings, so later saves reuse it."""
  return jax.jit(lambda xs: [_bits_sum(x) for x in xs], out_shardings=list(shardings))


def checksums(state) -> dict[str, int]:
  """Per array of `state` (a tree of jax.Arrays), the uint32 sum of its bits; the same for any
  sharding and process count (integer sums are exact), read from this process's replica."""
  leaves = jax.tree_util.tree_leaves_with_path(state)
  shardings = tuple(NamedSharding(x.sharding.mesh, PartitionSpec())
                    if isinstance(x.sharding, NamedSharding) else None for _, x in leaves)
  totals = _bits_sums(shardings)([x for _, x in leaves])
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
          int(np.asarray(total.addressable_shards[0].data))
          for (path, _), total in zip(leaves, totals)}


def _first_line(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class Checkpointer:
  """Orbax's CheckpointManager with the failures a run can meet (an unwritable or full disk,
  a damaged step) turned into CheckpointErrors that name the directory and the fix."""

  def __init__(self, run_dir: str, cfg: CheckpointConfig):
    self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    self.cfg = cfg
    try:
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=cfg.keep,
              # Exactly every N steps: Orbax's default policy also saves a run's first step.
              save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(cfg.every),
              enable_async_checkpointing=cfg.async_save,
              # In save(), so an unwritable directory fails there, not as a 300 s wait for a
              # signal from a background thread that already died.
              async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
              create=True,
          ),
      )
      with tempfile.TemporaryFile(dir=self.directory):  # fail now, not after `every` steps
        pass
    except OSError as e:
      raise CheckpointError(
          f"cannot write checkpoints to {self.directory} ({_first_line(e)}); point "
          "train.run_dir at a writable directory") from e

  def incomplete(self) -> list[str]:
    return sorted(n for n in os.listdir(self.directory) if ".orbax-checkpoint-tmp" in n)

  def latest_step(self) -> int | None:
    leftovers = self.incomplete()
    if leftovers:
      log.warning(
          "IGNORING %d incomplete checkpoint(s) in %s (a save was cut short): %s",
          len(leftovers), self.directory, ", ".join(leftovers),
      )
    return self.manager.latest_step()

  def _write_failed(self, e: Exception) -> CheckpointError:
    complete = list(self.manager.all_steps())
    return CheckpointError(
        f"writing a checkpoint to {self.directory} failed ({_first_line(e)}); the newest "
        f"complete step is {complete[-1] if complete else 'none'}. Free space or fix the "
        "filesystem, then run the same command to resume from it.")

  def _check_space(self, step: int, state) -> None:
    """Refuse a save that cannot fit before writing a byte of it: a disk that fills up in the
    middle of an asynchronous save fails in background threads, far from the cause."""
    need = sum(shard.data.nbytes for x in jax.tree.leaves(state)
               for shard in x.addressable_shards if shard.replica_id == 0)
    free = shutil.disk_usage(self.directory).free
    if need > free:
      complete = list(self.manager.all_steps())
      raise CheckpointError(
          f"checkpoint step {step} needs about {need / 2**20:.1f} MiB in {self.directory} but "
          f"only {free / 2**20:.1f} MiB are free (No space left on device); the newest "
          f"complete step is {complete[-1] if complete else 'none'}. Free space, then run the "
          "same command to resume from it.")

  def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
    """Start writing `step` (asynchronously by default); a failure of this or an earlier
    asynchronous save raises here."""
    if force or self.manager.should_save(step):
      self._check_space(step, state)
    try:
      return self.manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=ocp.args.JsonSave({**data_state, "layout": LAYOUT,
                                      "checksums": checksums(state)}),
          ),
          force=force,
      )
    except SAVE_FAILED as e:
      raise self._write_failed(e) from e

  def _unreadable(self, step: int, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint step {step} in {self.directory} cannot be restored ({_first_line(e)}). "
        "It is corrupt, partial or from another model shape. Nothing was overwritten. Move "
        "that step directory aside to resume from an earlier one (complete steps: "
        f"{list(self.manager.all_steps())}), or point train.run_dir at a new directory to start "
        "over.")

  def restore(self, step: int, target_state):
    """Restore `step` onto the shardings of `target_state` (a TrainState of arrays or
    ShapeDtypeStructs); returns (state, data)."""
    try:
      data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
      data = data["data"]
    except UNREADABLE as e:
      raise self._unreadable(step, e) from e
    refused = refusal(os.path.join(self.directory, str(step)), data)
    if refused:
      raise CheckpointError(refused)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(target_state))))["state"]
    except UNREADABLE as e:
      raise self._unreadable(step, e) from e
    self._verify(step, restored, data)
    return restored, data

  def _verify(self, step: int, state, data: dict) -> None:
    saved = data.get("checksums", {})
    bad = [path for path, value in checksums(state).items() if saved.get(path) != value]
    if bad:
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory}: {len(bad)} array(s) do not match the "
          f"checksums saved with them (first: {bad[0]}); the stored bits changed after the "
          "save. Nothing was overwritten. Move that step directory aside to resume from an "
          f"earlier one (complete steps: {list(self.manager.all_steps())}).")

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except SAVE_FAILED as e:
      raise self._write_failed(e) from e

  def close(self) -> None:
    """Finish the saves in flight (raising if one failed), then release the manager."""
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except SAVE_FAILED:
        pass  # the same failure, raised by wait() above


def restore_params(run_dir: str, trees: tuple[str, ...] = ("params",),
                   key: str = "checkpoint.init_from") -> dict:
  """The `trees` of the state ("params", "frozen"), by model, of a run directory's newest
  checkpoint, as host arrays; with the default, the trainable parameters alone. `key` names
  the setting that gave `run_dir` in errors.

  Never reads the optimizer state, so a warm start works for any model shape; the caller
  checks the shapes against its own models.
  """
  directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
  if not os.path.isdir(directory):
    raise CheckpointError(f"{key}={run_dir!r} has no {directory}")
  manager = ocp.CheckpointManager(
      directory,
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(create=False),
  )
  try:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(f"{key}={run_dir!r} holds no complete checkpoint")
    try:
      data = manager.restore(step, args=ocp.args.Composite(
          data=ocp.args.JsonRestore()))["data"]
      refused = refusal(os.path.join(directory, str(step)), data)
      if refused:
        raise CheckpointError(refused)
      tree = manager.item_metadata(step)["state"].tree
      target = {t: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[t])
                for t in trees if tree.get(t)}
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target,
          restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
          partial_restore=True,
      )))
    except UNREADABLE as e:
      raise CheckpointError(
          f"{key}={run_dir!r}: step {step} in {directory} cannot be read "
          f"({_first_line(e)})"
      ) from e
  finally:
    manager.close()
  state = restored["state"]
  return state["params"] if trees == ("params",) else state


def _merged(a, b):
  """Two trees of one model (its trainable and its frozen part) as one."""
  if not isinstance(a, dict) or not isinstance(b, dict):
    return b if isinstance(a, dict) and not a else a
  return {k: _merged(a.get(k, {}), b.get(k, {})) for k in {**a, **b}}


def restore_deliverable(run_dir: str, key: str = "checkpoint.init_from"
                        ) -> tuple[Deliverable, dict]:
  """(what it is, its parameters) of the model a run delivers (its task's first deliverable: a
  pretraining run's LM, a PPO run's policy, a reward run's reward model, ...), from the newest
  checkpoint, trainable and frozen parts together; `key` names the setting in errors."""
  config = os.path.join(run_dir, "config.yaml")
  if not os.path.isfile(config):
    raise CheckpointError(f"{key}={run_dir!r} has no {config}: it is not a run directory")
  try:
    task = read_yaml(config).get("task", "pretrain")
    _, model = deliverable(task, where=f"{key}={run_dir!r}")
  except ConfigError as e:
    raise CheckpointError(str(e)) from e
  state = restore_params(run_dir, ("params", "frozen"), key)
  tree = _merged(state.get("params", {}).get(model.group, {}),
                 state.get("frozen", {}).get(model.group, {}))
  for k in model.within:
    tree = tree.get(k, {})
  if not tree:
    raise CheckpointError(f"{key}={run_dir!r}: its checkpoint holds no {model.group} model")
  return model, tree
