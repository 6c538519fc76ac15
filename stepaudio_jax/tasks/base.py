"""What a training task is: its models, what of them trains and how, its batch, and its loss.

A task holds everything that differs between phases (pretraining, SFT, a reward model, PPO,
flow matching, a GAN vocoder). The step (training/step.py), the loop (training/loop.py) and the
setup (training/setup.py) are shared and never name a task: a new phase is one file with a
`Task` subclass plus its line in tasks/registry.py (or `register_task` from code of one's own).
A task's options are dataclasses in its file, declared in `sections`; the loader checks them
like every other section, and `cfg.<section>` reads them.

A task may also end a run: `stop_reason` sees every step's host metrics (a GAN whose
discriminator ran away), and the run stops there, like on a NaN, without checkpointing it.

Models are named parameter groups (`policy`, `critic`, `generator`, ...). The state holds, per
group, its trainable parameters (`params[name]`), the rest (`frozen[name]`: no gradient, no
optimizer state) and, for groups that train, one optimizer state (`opt_state[name]`).

A loss is pure: `loss(params, frozen, batch, rng) -> (loss_sum, sums)`, where params and frozen
map every group to its pure-dict tree and `sums` are additive (so microbatches add up); the step
divides the loss and its gradients by `sums[update.denominator]` of the whole batch.
"""

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from stepaudio_jax.config import RunConfig
from stepaudio_jax.config.training import OptimizerConfig
from stepaudio_jax.data.source import BatchSource
from stepaudio_jax.parallel.mesh import LogicalSharding

# RUN_DIR/eval_metrics.json: the newest eval's metrics, written by the trainer's eval hook and
# read by later phases (PPO normalises its reward with the reward run's score mean and std).
EVAL_METRICS = "eval_metrics.json"

Loss = Callable[[dict, dict, dict, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class Split(enum.Enum):
  TRAIN = "train"
  EVAL = "eval"  # held-out data, read from its first batch at every eval


@dataclasses.dataclass(frozen=True)
class BatchField:
  """One array of the global batch, declared: shape (batch first), dtype, one logical axis per
  dimension (mapped to mesh axes by mesh.rules; None = not sharded)."""

  shape: tuple[int, ...]
  dtype: Any
  axes: tuple[str | None, ...]

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f"batch field of shape {self.shape} needs one logical axis per "
                       f"dimension, got {self.axes}")


@dataclasses.dataclass(frozen=True)
class Model:
  """A named parameter group: how to build it, which of its variables train, and with what.

  `build(rngs)` makes the module (all of a task's models draw from one nnx.Rngs, in order).
  `trainable` is an nnx filter: matching variables get gradients and optimizer state, the rest
  is frozen. `optimizer` is required exactly when something trains.
  """

  build: Callable[[nnx.Rngs], nnx.Module]
  trainable: Any = nnx.Param
  optimizer: OptimizerConfig | None = None


@dataclasses.dataclass(frozen=True)
class Update:
  """One optimizer update inside a step: the groups it trains and the loss they descend.

  A step runs its task's updates in order, each seeing the parameters the previous ones wrote:
  (discriminator, generator) is the usual alternating GAN step. `epochs` x `minibatches` makes
  it several optimizer updates over the prepared batch (PPO); `starts_at` holds it back until
  that step (a critic warm-up with the policy frozen); `report_first` names metrics also
  reported from the very first of its updates (`first/<name>`: PPO's ratio there must be 1).
  """

  groups: tuple[str, ...]
  loss: Loss
  name: str = ""
  denominator: str = "tokens"
  epochs: int = 1
  minibatches: int = 1
  starts_at: int = 0
  report_first: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Deliverable:
  """A model that leaves its run (export, score, generate, another run's warm start): the
  group of the state that holds it, the subtree within that group, and what it is.

  `kind` says how it is read and exported: "step1" (a Step1 LM), "reward" (the Step1 backbone
  with a scalar head: a reward model or a critic), "flow" (codes -> mel), "vocoder" (mel ->
  waveform), "phone_encoder" (mel -> 60 ms states for a k-means tokenizer).
  """

  group: str
  kind: str
  within: tuple[str, ...] = ()


def minibatch(batch, minibatches: int, index: jax.Array, epoch: jax.Array | int = 0,
              key: jax.Array | None = None):
  """Minibatch `index` of `minibatches` in pass `epoch` over the rows of `batch` (any tree of
  arrays, rows first): the first pass takes contiguous blocks in order, so per-row values a
  task computes before the updates (map_first_pass) meet them on the same rows; later passes
  take a permutation drawn from fold_in(key, epoch), which only they need."""
  rows = jax.tree.leaves(batch)[0].shape[0]
  size = rows // minibatches
  order = jnp.arange(rows)
  if key is not None:
    shuffled = jax.random.permutation(jax.random.fold_in(key, epoch), rows)
    order = jnp.where(epoch == 0, order, shuffled)
  elif not isinstance(epoch, int) or epoch:
    raise ValueError("minibatch: passes after the first shuffle and need the update's key")
  take = jax.lax.dynamic_slice_in_dim(order, index * size, size)
  return jax.tree.map(lambda x: jnp.take(x, take, axis=0), batch)


def map_first_pass(fn: Callable, minibatches: int, *arrays):
  """fn(*arrays of one minibatch) over the first pass's minibatches in order, its results
  joined back in row order: e.g. PPO's old logprobs, computed on exactly the rows each of its
  first updates trains on, so the first ratio is 1 to the bit."""
  out = jax.lax.map(lambda i: fn(*minibatch(arrays, minibatches, i)), jnp.arange(minibatches))
  return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)


def split_model(module: nnx.Module, trainable) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graph, trainable state, frozen state): the one split every part of the stack uses."""
  return nnx.split(module, trainable, ...)


class Task:
  """Base class: subclasses define `models`, `batch_fields`, `loss` and `make_source`.

  Built once per run by the setup with the run's config and sharding; everything it returns is
  a pure function of them.
  """

  # Metrics shown on the progress line, the first one also for eval (the rest are in TensorBoard).
  progress_keys: tuple[str, ...] = ("loss", "grad_norm", "learning_rate")
  # What items_per_step counts (tokens, samples, frames, pairs): the progress line shows
  # `<unit>/s` ("tok/s" for tokens), metrics.jsonl and TensorBoard `<unit>_per_second`.
  throughput_unit: str = "tokens"
  # The YAML sections this task reads besides RunConfig's: name -> frozen dataclass.
  sections: ClassVar[Mapping[str, type]] = {}
  # The models of a run that may leave it, by name; the first is what the run delivers.
  deliverables: ClassVar[Mapping[str, Deliverable]] = {}
  # Whether the step's cost grows layer by layer with model.num_layers (Step1 models, their
  # layers scanned with model.scan_layers): `stepaudio compile` then estimates the step time
  # from unrolled compiles at two depths (training/aot.py); other tasks are costed as configured.
  scans_step1_layers: ClassVar[bool] = False
  # The config sections of the optimizers its models train with (each has learning_rate and
  # grad_clip_norm): the advice after a non-finite metric names them.
  optimizer_keys: ClassVar[tuple[str, ...]] = ("optimizer",)

  @classmethod
  def check_config(cls, cfg: RunConfig) -> None:
    """Raise ValueError, naming the keys, for values across sections that cannot work
    together; the loader runs it, so a bad config stops before anything is built."""

  @classmethod
  def length_keys(cls, cfg: RunConfig) -> tuple[str, ...]:
    """The dotted keys that decide the run's length in place of train.steps (see total_steps);
    () = train.steps does. The loader refuses a config that sets train.steps (to another value
    than its default) in the layer that sets these keys or a later one, since it would be
    ignored, and train.epochs where these keys do not include it."""
    return ()

  def __init__(self, cfg: RunConfig, shard: LogicalSharding | None):
    self.cfg, self.shard = cfg, shard
    self._abstract: dict[str, tuple[nnx.GraphDef, nnx.State, nnx.State]] = {}

  # -- what a subclass defines -------------------------------------------------------------

  def models(self) -> dict[str, Model]:
    raise NotImplementedError

  def batch_fields(self) -> dict[str, BatchField]:
    raise NotImplementedError

  def loss(self, params: dict, frozen: dict, batch: dict, rng: jax.Array
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    raise NotImplementedError

  def make_source(self, split: Split) -> BatchSource:
    raise NotImplementedError

  def prepare(self, params: dict, frozen: dict, batch: dict, rng: jax.Array
              ) -> tuple[dict, dict[str, jax.Array]]:
    """(the batch the updates see, metrics), computed in the step without gradients; by
    default the batch as it came."""
    return batch, {}

  def total_steps(self) -> int:
    """The run's length: train.steps, unless the task's data decides it (train.epochs)."""
    return self.cfg.train.steps

  def updates(self) -> tuple[Update, ...]:
    """One update of every trained group on `loss`; override for several (e.g. G/D)."""
    trained = tuple(n for n, m in self.models().items() if m.optimizer is not None)
    return (Update(trained, self.loss),)

  def metrics(self, sums: dict[str, jax.Array], update: Update) -> dict[str, jax.Array]:
    """Reported values from the sums of `update`'s loss: `loss` is the mean over its
    denominator; other sums pass through."""
    return {"loss": sums["loss_sum"] / jnp.maximum(sums[update.denominator], 1.0),
            **{k: v for k, v in sums.items() if k != "loss_sum"}}

  def stop_reason(self, metrics: dict[str, float]) -> str | None:
    """Why the run must stop after a step with these host metrics (names as the step reports
    them), with what to change, or None to go on; the step is not checkpointed."""
    return None

  def eval_sums(self, params: dict, frozen: dict, batch: dict, rng: jax.Array
                ) -> dict[str, jax.Array]:
    """What eval adds up over its batches: the first update's loss sums by default."""
    return self.updates()[0].loss(params, frozen, batch, rng)[1]

  def eval_metrics(self, sums: dict) -> dict:
    """Eval's reported values from the sums of all its batches."""
    return self.metrics(sums, self.updates()[0])

  def items_per_step(self) -> float:
    """How many `throughput_unit` one step trains on, for the rate (0 = none shown)."""
    return 0.0

  def flops_per_step(self) -> float:
    """Analytic model FLOPs of one step, for MFU (0 = not reported)."""
    return 0.0

  def analytic_bytes(self, micro_batch: int, devices: int) -> float | None:
    """Analytic HBM bytes per device of one step with `micro_batch` rows per microbatch, which
    `stepaudio compile` prints beside XLA's figure; None = no estimate for this task."""
    return None

  def warm_start(self, params: dict, frozen: dict,
                 load: Callable[..., tuple[Deliverable, dict]]) -> tuple[dict, dict]:
    """Step-0 (params, frozen) from other runs; `load(run_dir, key)` gives what a run delivers
    (its Deliverable and its parameters as host arrays; `key` names the setting in errors).
    By default `checkpoint.init_from` gives this task's own deliverable, of the same kind."""
    source = self.cfg.checkpoint.init_from
    if not source:
      return params, frozen
    got, tree = load(source, "checkpoint.init_from")
    if not self.deliverables:
      raise ValueError(f"checkpoint.init_from: a {self.cfg.task} run takes no model from "
                       "another run")
    want = next(iter(self.deliverables.values()))
    if got.kind != want.kind or want.within:
      raise ValueError(f"checkpoint.init_from={source!r} delivers a {got.kind} model; a "
                       f"{self.cfg.task} run starts from a {want.kind} model")
    if jax.tree.map(jnp.shape, tree) != jax.tree.map(jnp.shape, params[want.group]):
      raise ValueError(f"checkpoint.init_from={source!r}: its {got.kind} model has other shapes "
                       "than this run's; use the model config it was trained with")
    return {**params, want.group: tree}, frozen

  # -- provided ----------------------------------------------------------------------------

  def abstract(self, name: str) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Model `name` split as the state holds it, shapes only: (graph, trainable, frozen)."""
    if name not in self._abstract:
      model = self.models()[name]
      module = nnx.eval_shape(lambda: model.build(nnx.Rngs(0)))
      self._abstract[name] = split_model(module, model.trainable)
    return self._abstract[name]

  def graphdef(self, name: str) -> nnx.GraphDef:
    return self.abstract(name)[0]

  def merge(self, name: str, params: dict, frozen: dict) -> nnx.Module:
    """Group `name` as a module, from the state's params and frozen trees (all groups)."""
    return nnx.merge(self.graphdef(name), params[name], frozen[name])
