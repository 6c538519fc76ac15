"""Orbax checkpoints of the train state and the data iterator, restorable onto any mesh.

Layout: RUN_DIR/checkpoints/<step>/{state,data}. Orbax writes each step into a temporary
directory and renames it when complete, so a step directory is either whole or absent; leftover
temporary directories (a save cut short) are reported and never read. Restore takes abstract
targets that carry the current mesh's shardings, which is what lets a run saved on one mesh
resume on another.
"""

import dataclasses
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint that exists but cannot be used; training stops rather than start over."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 100  # save every N steps (and at the end, and on SIGTERM)
  keep: int = 3  # newest K complete checkpoints are kept
  async_save: bool = True  # training continues while a save is written
  resume: bool = True  # resume from the newest checkpoint in the run directory
  init_from: str = ""  # run directory of a (text-only) model whose params start step 0

  def __post_init__(self):
    if self.every <= 0 or self.keep <= 0:
      raise ValueError("checkpoint.every and checkpoint.keep must be positive")


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree,
  )


class Checkpointer:
  def __init__(self, run_dir: str, cfg: CheckpointConfig):
    self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    self.cfg = cfg
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            # Exactly every N steps: Orbax's default policy also saves the first step of a run.
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(cfg.every),
            enable_async_checkpointing=cfg.async_save,
            create=True,
        ),
    )

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

  def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        ),
        force=force,
    )

  def restore(self, step: int, target_state):
    """Restore `step` onto the shardings of `target_state` (arrays or ShapeDtypeStructs)."""
    try:
      restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(_abstract(target_state)), data=ocp.args.JsonRestore()
          ),
      )
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be restored ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}). It is corrupt, partial or from another "
          "model shape. Nothing was overwritten. Move that step directory aside to resume from "
          f"an earlier one (complete steps: {list(self.manager.all_steps())}), or point "
          "train.run_dir at a new directory to start over."
      ) from e
    return restored["state"], restored["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def restore_params(run_dir: str) -> dict:
  """The trainable parameters of a run directory's newest checkpoint, as host arrays.

  Reads only `params` (not the optimizer state), so init_from works for any model shape; the
  caller checks the shapes against its own model.
  """
  directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint.init_from={run_dir!r} has no {directory}")
  manager = ocp.CheckpointManager(
      directory,
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(create=False),
  )
  try:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(f"checkpoint.init_from={run_dir!r} holds no complete checkpoint")
    try:
      params = manager.item_metadata(step)["state"].tree["params"]
      target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), params)}
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target,
          restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
          partial_restore=True,
      )))
    except Exception as e:  # as in Checkpointer.restore: many error types for unreadable files
      raise CheckpointError(
          f"checkpoint.init_from={run_dir!r}: step {step} in {directory} cannot be read "
          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
      ) from e
  finally:
    manager.close()
  return restored["state"]["params"]
