"""Compile the train step ahead of time for a TPU topology, on any host (libtpu, no chips).

This answers "does this config fit, and how fast could it be?" before paying for hardware.
Memory: `memory_analysis()` of the step exactly as configured (right for scanned layers).
Time: XLA's cost model (`cost_analysis()`: flops and `optimal_seconds`) counts the body of a
scan once (facts.md 6), so a scanned model's figures cover one layer and one microbatch. For a
task whose cost grows with Step1's layers (Task.scans_step1_layers: the LM tasks) the estimate
therefore compiles the same step unrolled (scan off) at two small depths with one microbatch of
the configured size, extrapolates linearly to the real depth and multiplies by the number of
microbatches (the optimizer update, counted once per microbatch that way, is a few
milliseconds of memory traffic: the estimate errs slow by that much). Other tasks (flow,
vocoder) are costed as configured, one microbatch times their number. The analytic memory
figure is the task's own (Task.analytic_bytes), printed only where it has one.
"""

import dataclasses
import os
from collections.abc import Sequence

import jax
import numpy as np

from stepaudio_jax.config import ConfigError, RunConfig
from stepaudio_jax.launch import has_accelerator
from stepaudio_jax.tasks.registry import task_class
from stepaudio_jax.training.setup import setup


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: int
  peak_flops: float  # bf16 dense matmul, per chip


CHIPS = {  # by the generation prefix of a topology name ("v5p:8x8x8")
    "v4": Chip(32 << 30, 275e12),
    "v5e": Chip(16 << 30, 197e12),
    "v5p": Chip(95 << 30, 459e12),
    "v6e": Chip(32 << 30, 918e12),
}

# libtpu's settings on a host with no TPU (any valid accelerator type will do).
LIBTPU_OFF_TPU = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                  "TPU_ACCELERATOR_TYPE": "v5p-8"}


# The programs whose cost is read: XLA would turn large FSDP matmuls into collective matmuls
# (windowed einsum: while loops of collective-permutes), whose bodies the cost model counts
# once; with them off the gathers are whole and every FLOP is counted.
COSTED_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                  "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


GIB = 1 << 30


class DoesNotFit(ConfigError):
  """The step needs more HBM per chip than the topology has."""


@dataclasses.dataclass(frozen=True)
class AotReport:
  topology: str
  chips: int
  mesh: dict
  bytes_per_chip: int
  hbm_per_chip: int
  analytic_bytes_per_chip: float | None  # the task's estimate (Task.analytic_bytes), if any
  xla_flops: float  # of the compiled program as XLA counts it (one scan body once)
  step_flops: float  # analytic model FLOPs of one step (no remat recompute)
  tokens_per_step: float

  @property
  def fits(self) -> bool:
    return self.bytes_per_chip <= self.hbm_per_chip

  def describe(self, config: str) -> list[str]:
    """The memory lines of `stepaudio compile` for the run config at path `config`."""
    mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
    analytic = ("" if self.analytic_bytes_per_chip is None else
                f" (analytic estimate {self.analytic_bytes_per_chip / GIB:.2f} GiB)")
    return [f"{config} on {self.topology}: {self.chips} chips, mesh {mesh}",
            f"  HBM per chip      {self.bytes_per_chip / GIB:7.2f} GiB of "
            f"{self.hbm_per_chip / GIB:.0f} GiB: {'fits' if self.fits else 'DOES NOT FIT'}"
            + analytic]

  def overflow(self) -> str:
    """Why a step that does not fit does not, and what to change."""
    return (f"{self.bytes_per_chip / GIB:.2f} GiB per chip exceed the "
            f"{self.hbm_per_chip / GIB:.0f} GiB of HBM; lower the rows per chip "
            "(train.batch_size / train.grad_accum_steps), remat more (model.remat) or shard more "
            "(mesh.tensor, mesh.sequence)")


@dataclasses.dataclass(frozen=True)
class StepTimeEstimate:
  """XLA's whole-step figures, from unrolled compiles at `depths` (None: as configured)."""

  depths: tuple[int, int] | None  # the unrolled Step1 depths extrapolated from, if any
  num_layers: int
  microbatches: int
  xla_flops: float  # per chip: XLA costs the per-device program
  seconds: float
  step_flops: float
  tokens_per_step: float
  chips: int
  peak_flops: float
  # while loops left in the costed program (e.g. XLA's collective-matmul loops): each body is
  # counted once, so with any the estimate is too fast
  loops: int = 0

  @property
  def mfu(self) -> float:
    return self.step_flops / (self.seconds * self.chips * self.peak_flops)

  @property
  def xla_to_model(self) -> float:
    """XLA's FLOPs over the model's: >= 1 (remat recompute) unless XLA misses some work."""
    return self.xla_flops * self.chips / self.step_flops

  @property
  def tokens_per_second(self) -> float:
    return self.tokens_per_step / self.seconds

  def describe(self) -> list[str]:
    """The time lines of `stepaudio compile`, with what XLA's cost model misses."""
    lines = [f"  XLA FLOPs/step    {self.xla_flops:.3e} per chip"]
    if self.step_flops:  # tasks without an analytic count (flops_per_step 0) get no MFU
      lines += [f"  model FLOPs/step  {self.step_flops:.3e} (analytic, no remat recompute; XLA "
                f"counts {self.xla_to_model:.2f}x)",
                f"  XLA step time     {self.seconds:7.2f} s: {self.mfu:.1%} MFU at "
                f"{self.peak_flops / 1e12:.0f} TFLOP/s per chip, {self.tokens_per_second:,.0f} "
                "tokens/s"]
      if self.xla_to_model < 1:
        lines.append("  WARNING: XLA counts fewer FLOPs than the model needs, so its cost model "
                     "misses part of this program (a loop body counted once, or a kernel's "
                     "declared cost): this MFU is too high")
    else:
      lines.append(f"  XLA step time     {_seconds(self.seconds)} (the task reports no model "
                   "FLOPs: no MFU)")
    if self.loops:
      lines.append(f"  note: {self.loops} while loops remain in the costed program, each body "
                   "counted once (the image encoder's layer scan, a task's own scans)")
    lines.append("  (costed with XLA's collective matmuls off: their loop bodies would be counted "
                 "once)")
    if self.depths:
      lines.append(f"  (XLA's cost analysis counts a scanned layer once: the step was compiled "
                   f"unrolled at {self.depths[0]} and {self.depths[1]} layers and extrapolated "
                   f"linearly to {self.num_layers}"
                   + (f", one microbatch x {self.microbatches}" if self.microbatches > 1 else "")
                   + ")")
    elif self.microbatches > 1:
      lines.append(f"  (one microbatch compiled, x {self.microbatches})")
    return lines


def _seconds(seconds: float) -> str:
  return f"{seconds:7.2f} s" if seconds >= 0.1 else f"{seconds * 1e3:7.2f} ms"


def chip(topology: str) -> Chip:
  generation = topology.split(":")[0]
  if generation not in CHIPS:
    raise ConfigError(f"topology {topology!r}: unknown TPU generation {generation!r}; "
                      f"known: {sorted(CHIPS)} (e.g. v5p:8x8x8)")
  return CHIPS[generation]


def tpu_devices(topology: str, num_slices: int = 1) -> list:
  """Device descriptions of a TPU slice such as 'v5p:8x8x8' (4 chips per host)."""
  chip(topology)
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling touches no chip
  if not has_accelerator():
    # No TPU here: tell libtpu so, or it asks the (absent) metadata server for the worker
    # hostnames and accelerator type and logs errors; the topology below is explicit anyway.
    for name, value in LIBTPU_OFF_TPU.items():
      os.environ.setdefault(name, value)
  from jax.experimental import topologies

  topo = topologies.get_topology_desc(
      platform="tpu", topology_name=topology, chip_config_name="default",
      chips_per_host_bounds=(2, 2, 1), num_slices=num_slices)
  return list(topo.devices)


def _compile(cfg: RunConfig, devices: Sequence,
             options: dict | None = None) -> tuple[object, object]:
  """(setup, compiled train step); an HBM overflow becomes DoesNotFit with what to change."""
  run = setup(cfg, devices)
  try:
    return run, run.train.lower(run.abstract_state, run.batch).compile(compiler_options=options)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise DoesNotFit(
        f"the train step does not fit in HBM on {len(devices)} chips: {str(e).splitlines()[0]}; "
        "lower the rows per chip (train.batch_size / train.grad_accum_steps), remat more "
        "(model.remat=full) or shard more (mesh.tensor, mesh.sequence)") from e


def _cost(compiled) -> tuple[float, float, int]:
  """(flops, optimal_seconds, while loops in the program) of the per-device program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (float(cost.get("flops", np.nan)), float(cost.get("optimal_seconds", np.nan)),
          compiled.as_text().count(" while("))


def compile_train_step(cfg: RunConfig, topology: str, num_slices: int = 1
                       ) -> tuple[AotReport, object]:
  """(report, compiled executable) for cfg's train step on the given TPU slice."""
  devices = tpu_devices(topology, num_slices)
  run, compiled = _compile(cfg, devices)
  mem = compiled.memory_analysis()
  used = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  micro = cfg.train.batch_size // cfg.train.grad_accum_steps
  return AotReport(
      topology=topology,
      chips=len(devices),
      mesh={k: int(v) for k, v in run.mesh.shape.items()},
      bytes_per_chip=int(used),
      hbm_per_chip=chip(topology).hbm_bytes,
      analytic_bytes_per_chip=run.task.analytic_bytes(micro, len(devices)),
      xla_flops=_cost(compiled)[0],
      step_flops=run.task.flops_per_step(),
      tokens_per_step=run.task.items_per_step(),
  ), compiled


def _one_microbatch(cfg: RunConfig) -> RunConfig:
  micro = cfg.train.batch_size // cfg.train.grad_accum_steps
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=micro,
                                                            grad_accum_steps=1))


def _at_depth(cfg: RunConfig, num_layers: int) -> RunConfig:
  """One microbatch of cfg's step, its layers unrolled, at another depth."""
  cfg = _one_microbatch(cfg)
  return dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, num_layers=num_layers, scan_layers=False))


def estimate_step_time(cfg: RunConfig, topology: str, num_slices: int = 1,
                       depths: tuple[int, int] = (1, 2)) -> StepTimeEstimate:
  """XLA's estimated step time, with collective matmuls off (COSTED_OPTIONS); the scanned
  Step1 layers of an LM task are compiled unrolled at two depths and the figures extrapolated
  linearly to model.num_layers (a scanned layer is counted once); other tasks' steps are
  costed as configured."""
  devices = tpu_devices(topology, num_slices)
  n_layers, accum = cfg.model.num_layers, cfg.train.grad_accum_steps
  layered = task_class(cfg.task).scans_step1_layers
  if not layered:
    n_layers = 0
  if not (layered and cfg.model.scan_layers) and accum == 1:
    run, compiled = _compile(cfg, devices, COSTED_OPTIONS)
    flops, seconds, loops = _cost(compiled)
    used = None
  elif not layered:  # one microbatch as configured, times their number
    flops, seconds, loops = _cost(_compile(_one_microbatch(cfg), devices, COSTED_OPTIONS)[1])
    flops, seconds, used = accum * flops, accum * seconds, None
    run = setup(cfg, devices)
  else:
    lo, hi = depths
    if not 0 < lo < hi:
      raise ConfigError(f"estimate depths must be 0 < lo < hi, got {depths}")
    (f_lo, s_lo, _), (f_hi, s_hi, loops) = (
        _cost(_compile(_at_depth(cfg, d), devices, COSTED_OPTIONS)[1]) for d in depths)
    scale = (n_layers - lo) / (hi - lo)
    flops = accum * (f_lo + (f_hi - f_lo) * scale)
    seconds = accum * (s_lo + (s_hi - s_lo) * scale)
    used = (lo, hi)
    run = setup(cfg, devices)
  if not seconds > 0:
    raise RuntimeError("XLA's cost analysis gave no optimal_seconds for this program")
  return StepTimeEstimate(
      depths=used, num_layers=n_layers, microbatches=accum, xla_flops=flops, seconds=seconds,
      step_flops=run.task.flops_per_step(), tokens_per_step=run.task.items_per_step(),
      chips=len(devices), peak_flops=chip(topology).peak_flops, loops=loops)


def parameter_shardings(cfg: RunConfig, devices: Sequence) -> dict[str, str]:
  """'params|frozen/<model>/<path> [shape] dtype' -> PartitionSpec of every parameter on
  `devices`, from abstract shapes (nothing compiled): the table a golden test pins."""
  state = setup(cfg, devices).abstract_state
  out = {}
  for kind, tree in (("params", state.params), ("frozen", state.frozen)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      name = jax.tree_util.keystr(path, simple=True, separator="/")
      out[f"{kind}/{name} {list(leaf.shape)} {leaf.dtype}"] = str(leaf.sharding.spec)
  return out
