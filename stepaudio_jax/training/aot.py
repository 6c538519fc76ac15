"""Compile the train step ahead of time for a TPU topology, on any host (libtpu, no chips).

This answers "does this config fit, and how fast could it be?" before paying for hardware:
`memory_analysis()` gives the per-chip bytes of the sharded step; `cost_analysis()` gives XLA's
FLOP and time estimate (for a scanned model it covers one layer's body once; see facts.md 6).
"""

import dataclasses
import os

import numpy as np

from stepaudio_jax.config import RunConfig
from stepaudio_jax.models import flops as flops_lib
from stepaudio_jax.training.setup import setup

HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}


@dataclasses.dataclass(frozen=True)
class AotReport:
  topology: str
  chips: int
  mesh: dict
  bytes_per_chip: int
  hbm_per_chip: int
  analytic_bytes_per_chip: float
  xla_flops: float
  step_flops: float

  @property
  def fits(self) -> bool:
    return self.bytes_per_chip <= self.hbm_per_chip


def tpu_devices(topology: str, num_slices: int = 1) -> list:
  """Device descriptions of a TPU slice such as 'v5p:8x8x8' (4 chips per host)."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling touches no chip
  from jax.experimental import topologies

  topo = topologies.get_topology_desc(
      platform="tpu", topology_name=topology, chip_config_name="default",
      chips_per_host_bounds=(2, 2, 1), num_slices=num_slices)
  return list(topo.devices)


def compile_train_step(cfg: RunConfig, topology: str, num_slices: int = 1
                       ) -> tuple[AotReport, object]:
  """(report, compiled executable) for cfg's train step on the given TPU slice."""
  devices = tpu_devices(topology, num_slices)
  run = setup(cfg, devices)
  mesh, tc = run.mesh, cfg.train
  compiled = run.train.lower(run.abstract_state, run.batch).compile()
  mem = compiled.memory_analysis()
  used = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  generation = topology.split(":")[0]
  chips = len(devices)
  micro = tc.batch_size // tc.grad_accum_steps
  return AotReport(
      topology=topology,
      chips=chips,
      mesh={k: int(v) for k, v in mesh.shape.items()},
      bytes_per_chip=int(used),
      hbm_per_chip=HBM_BYTES.get(generation, 0),
      analytic_bytes_per_chip=flops_lib.train_memory_estimate(cfg, micro, chips).total,
      xla_flops=float(cost.get("flops", np.nan)),
      step_flops=run.task.flops_per_step(),
  ), compiled
