"""The training loop: mesh, state, resume, jitted step, eval, checkpoints, progress.

Resume order: the newest complete checkpoint in RUN_DIR/checkpoints restores the step, the
parameters, the optimizer state, the RNG and the data iterator state onto the current mesh;
without one the state is initialised from the seed (and from checkpoint.init_from, whose
vocabulary is expanded if it is a text-only model). A checkpoint that exists but cannot be read
stops the run: it never falls back to step 0.
"""

import dataclasses
import logging
import math
import os
import signal

import jax
import numpy as np

from stepaudio_jax.data.loader import GrainLoader, LoaderStateError
from stepaudio_jax.data.packing import empty_row
from stepaudio_jax.data.synthetic import SyntheticSource
from stepaudio_jax.models.omni import expand_vocabulary
from stepaudio_jax.parallel.mesh import LogicalSharding, make_mesh
from stepaudio_jax.training import flops as flops_lib
from stepaudio_jax.training import loss as loss_lib
from stepaudio_jax.training import train_step as ts
from stepaudio_jax.training.checkpoint import Checkpointer, CheckpointError, restore_params
from stepaudio_jax.training.optimizer import learning_rate_schedule, make_optimizer
from stepaudio_jax.training.progress import Progress

log = logging.getLogger(__name__)

TRAIN_SPLIT, EVAL_SPLIT = 0, 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  run_dir: str = "runs/default"
  steps: int = 1000
  batch_size: int = 8  # global, in sequences
  seq_len: int = 1024
  grad_accum_steps: int = 1  # the batch is split into this many microbatches
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0  # 0 = no periodic eval
  eval_batches: int = 2
  peak_flops_per_device: float = 0.0  # for MFU; 0 = known accelerator table or measured

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "grad_accum_steps", "log_every"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.batch_size % self.grad_accum_steps:
      raise ValueError(
          f"batch_size={self.batch_size} is not divisible by grad_accum_steps="
          f"{self.grad_accum_steps}"
      )


# bf16 dense matmul peaks, FLOP/s per device.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12,
              "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def device_peak_flops(cfg: TrainConfig) -> float:
  if cfg.peak_flops_per_device:
    return cfg.peak_flops_per_device
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS.items():
    if kind.startswith(name):
      return peak
  # CPU (emulated devices share the host): the host's measured peak split evenly.
  return flops_lib.measure_matmul_peak(1024) / jax.local_device_count()


class _StopFlag:
  """Set by SIGTERM (preemption): the loop saves a checkpoint and exits cleanly.

  A context manager, so the caller's own SIGTERM handler is back once training returns or fails.
  """

  def __enter__(self):
    self.set, self._previous = False, None
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread; the caller handles signals
      pass
    return self

  def __exit__(self, *_):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, *_):
    self.set = True


def global_batch_shapes(cfg) -> dict:
  """Shapes of one global batch; every data source fills the same row layout."""
  row = empty_row(cfg.train.seq_len, cfg.tokens, cfg.vision)
  return {k: jax.ShapeDtypeStruct((cfg.train.batch_size,) + v.shape, v.dtype)
          for k, v in row.items()}


def load_batch(source: SyntheticSource, split: int, step: int, global_batch: int, shardings):
  """This process's rows of the global batch, assembled into global arrays."""
  per_process = global_batch // jax.process_count()
  start = jax.process_index() * per_process
  local = source.batch(split, step, range(start, start + per_process))
  return jax.tree.map(jax.make_array_from_process_local_data, shardings, local)


def make_grain_loader(cfg, eval_step: int | None = None) -> GrainLoader:
  """The training loader, or (with eval_step) a fresh eval loader on another shuffle that mixes
  as the stage of that step does."""
  tc = cfg.train
  seed = tc.seed + (cfg.data.eval_seed_offset if eval_step is not None else 0)
  return GrainLoader(cfg.data, cfg.tokens, cfg.vision, tc.seq_len, tc.batch_size, seed, eval_step)


def _init_from(cfg, state: ts.TrainState, shardings: ts.TrainState) -> ts.TrainState:
  loaded = {"lm": restore_params(cfg.checkpoint.init_from)["lm"]}
  old_vocab = loaded["lm"]["embed"].shape[0]
  if old_vocab != cfg.model.vocab_size:
    loaded = expand_vocabulary(loaded, cfg.model.vocab_size, jax.random.key(cfg.train.seed + 7))
    log.warning("expanded vocabulary of %s from %d to %d", cfg.checkpoint.init_from, old_vocab,
                cfg.model.vocab_size)
  want = jax.tree.map(lambda x: x.shape, state.params["lm"])
  got = jax.tree.map(lambda x: x.shape, loaded["lm"])
  if want != got:
    raise CheckpointError(
        f"checkpoint.init_from={cfg.checkpoint.init_from!r} has LM shapes {got} but the model "
        f"config needs {want}; use a model config that matches it"
    )
  lm = jax.device_put(loaded["lm"], shardings.params["lm"])
  return state.replace(params={**state.params, "lm": lm})


def train(cfg, print_fn=print) -> list[dict]:
  """Run training per `cfg` (a RunConfig); returns the fetched per-step metrics."""
  tc = cfg.train
  mesh = make_mesh(cfg.mesh)
  shard = LogicalSharding.create(mesh, cfg.mesh.rules)
  lead = jax.process_index() == 0
  tx = make_optimizer(cfg.optimizer, tc.steps)
  source = SyntheticSource(cfg.synthetic, cfg.tokens, cfg.vision, tc.seq_len, tc.seed)
  loader = make_grain_loader(cfg) if cfg.data.source == "grain" else None
  steps = ts.build_steps(cfg, shard, tx, global_batch_shapes(cfg),
                         learning_rate_schedule(cfg.optimizer, tc.steps), tc.seed)
  shardings, batch_sh = steps.state_shardings, steps.batch_shardings

  ckpt = Checkpointer(tc.run_dir, cfg.checkpoint)
  latest = ckpt.latest_step()
  if latest is not None and not cfg.checkpoint.resume:
    raise CheckpointError(
        f"{ckpt.directory} already holds checkpoints (newest step {latest}) and "
        "checkpoint.resume=false; choose a new train.run_dir so nothing is overwritten"
    )
  if latest is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          steps.abstract_state, shardings)
    state, data_state = ckpt.restore(latest, target)
    if lead:
      print_fn(f"resumed from {ckpt.directory} at step {latest}", flush=True)
  else:
    with jax.set_mesh(mesh):
      state = steps.init()
    if cfg.checkpoint.init_from:
      state = _init_from(cfg, state, shardings)
    data_state = {"step": 0}
    if lead:
      print_fn(f"no checkpoint in {ckpt.directory}: starting at step 0", flush=True)
  start = int(jax.device_get(state.step))
  if data_state["step"] != start:
    raise CheckpointError(
        f"checkpoint step {start} carries data iterator state for step {data_state['step']}"
    )
  saved_steps = data_state.get("train_steps", tc.steps)
  if start and saved_steps != tc.steps and not cfg.optimizer.decay_steps and lead:
    print_fn(f"WARNING: this run was saved with train.steps={saved_steps} and resumes with "
             f"{tc.steps}: schedules that end with the run (optimizer.decay_steps=0) change "
             "shape from here; set optimizer.decay_steps to keep the old one", flush=True)
  if loader is not None and start:
    if "iterator" not in data_state:
      raise CheckpointError(
          f"checkpoint step {start} was written with data.source=synthetic and has no Grain "
          "iterator state; resume it with data.source=synthetic or start a new train.run_dir")
    try:
      loader.set_state(data_state["iterator"])
    except LoaderStateError as e:
      raise CheckpointError(f"checkpoint step {start}: {e}") from e

  def data_state_at(step: int) -> dict:
    """What the checkpoint stores about the data (a collective with the Grain loader)."""
    state = {"step": step, "train_steps": tc.steps}
    return state if loader is None else {**state, "iterator": loader.get_state()}

  def next_batch(split: int, step: int, grain_loader: GrainLoader | None):
    if grain_loader is None:
      return load_batch(source, split, step, tc.batch_size, batch_sh), {}
    batch = grain_loader.next_batch(batch_sh)
    return batch, {f"data/{k.replace('/', '_')}": float(v) for k, v in grain_loader.stats().items()}

  tokens_per_step = tc.batch_size * tc.seq_len
  peak = device_peak_flops(tc) * jax.device_count()
  progress = Progress(os.path.join(tc.run_dir, "tensorboard"), tc.steps,
                      flops_lib.train_step_flops(cfg, tc.batch_size), peak, lead, print_fn)
  history: list[dict] = []
  pending = None

  def fetch(pending):
    done_step, metrics, data_stats = pending
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()} | data_stats
    if not math.isfinite(metrics["loss"]):
      raise FloatingPointError(f"loss became {metrics['loss']} at step {done_step}; stopping")
    history.append({"step": done_step, **metrics})
    if done_step % tc.log_every == 0 or done_step == tc.steps:
      progress.log_train(done_step, metrics, tokens_per_step)

  progress.start(start)
  step, malformed = start, 0
  with jax.set_mesh(mesh), _StopFlag() as stop:
    while step < tc.steps and not stop.set:
      batch, data_stats = next_batch(TRAIN_SPLIT, step, loader)
      if lead and data_stats.get("data/malformed", 0) > malformed:
        malformed = int(data_stats["data/malformed"])
        print_fn(f"data: {malformed} malformed records skipped so far (this process)", flush=True)
      state, metrics = steps.train(state, batch)
      step += 1
      if pending is not None:
        fetch(pending)
      pending = (step, metrics, data_stats)
      if loader is None or ckpt.manager.should_save(step):
        ckpt.save(step, state, data_state_at(step))
      if tc.eval_every and step % tc.eval_every == 0:
        sums = None
        eval_loader = make_grain_loader(cfg, eval_step=step) if loader is not None else None
        for i in range(tc.eval_batches):
          out = steps.eval(state, next_batch(EVAL_SPLIT, i, eval_loader)[0])
          sums = out if sums is None else jax.tree.map(np.add, sums, out)
        progress.log_eval(step, {k: float(v) for k, v in loss_lib.finalize(sums).items()})
    if pending is not None:
      fetch(pending)
    if ckpt.manager.latest_step() != step:
      ckpt.save(step, state, data_state_at(step), force=True)
    ckpt.wait()  # still under the handler: a second SIGTERM does not cut the save short
  ckpt.close()
  progress.close()
  if stop.set and lead:
    print_fn(f"SIGTERM: saved step {step} to {ckpt.directory}; exiting", flush=True)
  return history
