"""The hybrid mesh: ICI axes within a slice, the mesh.dcn_* ways across slices, checked on a
2-slice v5p topology compiled ahead of time with libtpu (no chips), and its config errors."""

import numpy as np
import pytest

from stepaudio_jax.config import ConfigError
from stepaudio_jax.config.mesh import MeshConfig
from stepaudio_jax.parallel.mesh import make_mesh
from stepaudio_jax.tasks.registry import load_config


def test_dcn_ways_must_divide_their_axis_and_match_the_slices():
  with pytest.raises(ValueError, match="dcn_data and mesh.dcn_fsdp must be >= 1"):
    MeshConfig(dcn_data=0)
  with pytest.raises(ValueError, match="mesh.dcn_fsdp=3 does not divide mesh.fsdp=4"):
    MeshConfig(data=2, fsdp=4, dcn_fsdp=3).split(8)
  assert MeshConfig(data=2, fsdp=-1, tensor=2, dcn_data=2).split(16) == ((1, 4, 1, 2), (2, 1, 1, 1))
  with pytest.raises(ConfigError, match="must equal the number of processes, which is 1"):
    make_mesh(MeshConfig(data=2, fsdp=4, dcn_data=2))  # 8 CPU devices in one process


@pytest.fixture(scope="module")
def two_slices():
  pytest.importorskip("libtpu", reason="libtpu is not installed: pip install 'jax[tpu]'")
  from stepaudio_jax.training.aot import tpu_devices

  return tpu_devices("v5p:2x2x1", num_slices=2)


@pytest.mark.parametrize("dcn", ["dcn_data", "dcn_fsdp"])
def test_each_slice_holds_a_whole_ici_block(two_slices, dcn):
  """Across the dcn axis the slice changes; along every other axis it never does."""
  cfg = MeshConfig(data=2, fsdp=2, tensor=2, **{dcn: 2})
  mesh = make_mesh(cfg, two_slices)
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  across = {"dcn_data": 0, "dcn_fsdp": 1}[dcn]
  assert (np.moveaxis(slices, across, 0)[0] == 0).all()
  assert (np.moveaxis(slices, across, 0)[1] == 1).all()
  with pytest.raises(ConfigError, match="number of slices, which is 2"):
    make_mesh(MeshConfig(data=4, fsdp=2, tensor=1, dcn_data=4), two_slices)


def test_train_step_compiles_for_two_v5p_slices(two_slices):
  """The tiny model's whole train step on 2 x v5p:2x2x1 (8 chips): data across the slices over
  DCN, fsdp and tensor within each; the gradient all-reduce spans the slices."""
  from stepaudio_jax.training.aot import compile_train_step

  cfg = load_config("configs/tiny.yaml", ["mesh.data=2", "mesh.dcn_data=2", "mesh.fsdp=2",
                                          "mesh.tensor=2", "vision.enabled=false"])
  report, compiled = compile_train_step(cfg, "v5p:2x2x1", num_slices=2)
  assert report.chips == 8 and report.mesh == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
  assert report.fits
  assert "all-reduce" in compiled.as_text()
