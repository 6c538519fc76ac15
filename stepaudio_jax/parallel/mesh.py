"""Device mesh and logical-axis rules, MaxText style.

Parameters and activations name their axes logically ("embed", "heads", "act_batch"); one rules
table in the config maps each name to zero or more mesh axes. Changing the parallelism of a run
is a config edit, never a model edit.
"""

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from stepaudio_jax.config import ConfigError
from stepaudio_jax.config.mesh import MESH_AXES, MeshConfig


def _granules(devices: Sequence[jax.Device]) -> tuple[int, bool]:
  """(number of slices, or of processes where devices carry no slice index; which it is)."""
  if all(getattr(d, "slice_index", None) is not None for d in devices):
    return len({d.slice_index for d in devices}), False
  return len({d.process_index for d in devices}), True


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, sequence, tensor) mesh. With mesh.dcn_* > 1 a hybrid mesh: each slice (or
  process) holds a contiguous ICI block of every axis, and the dcn ways of data and fsdp step
  across slices; otherwise the device list reshaped in order."""
  devices = list(devices if devices is not None else jax.devices())
  if cfg.dcn_ways == 1:
    grid = np.asarray(devices).reshape(tuple(cfg.shape(len(devices)).values()))
  else:
    ici, dcn = cfg.split(len(devices))
    granules, by_process = _granules(devices)
    if granules != cfg.dcn_ways:
      unit = "processes" if by_process else "slices"
      raise ConfigError(
          f"mesh.dcn_data x mesh.dcn_fsdp = {cfg.dcn_ways} must equal the number of {unit}, "
          f"which is {granules}")
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass(frozen=True)
class LogicalSharding:
  """A mesh with its rules: turns logical axis names into shardings and constraints."""

  mesh: Mesh
  rules: tuple[tuple[str, tuple[str, ...]], ...]

  @classmethod
  def create(cls, mesh: Mesh, rules: dict[str, list[str]]) -> "LogicalSharding":
    return cls(mesh, tuple((k, tuple(v)) for k, v in sorted(rules.items())))

  def spec(self, axes: Sequence[str | None]) -> PartitionSpec:
    table = dict(self.rules)
    used: set[str] = set()
    out = []
    for name in axes:
      if name is None:
        out.append(None)
        continue
      if name not in table:
        raise ConfigError(f"logical axis {name!r} has no rule; add mesh.rules.{name}=[...]")
      # axes of size 1, or absent from a hand-built mesh, shard nothing
      mesh_axes = tuple(a for a in table[name]
                        if a not in used and self.mesh.shape.get(a, 1) > 1)
      used.update(mesh_axes)
      out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*out)

  def named(self, axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(axes))

  def ways(self, entry: str | tuple[str, ...] | None) -> int:
    """How many shards one PartitionSpec entry splits a dimension into."""
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    return math.prod(self.mesh.shape[a] for a in names)

  def check_divides(self, what: str, shape: Sequence[int], axes: Sequence[str | None]) -> None:
    for dim, entry in zip(shape, self.spec(axes)):
      ways = self.ways(entry)
      if dim % ways:
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        raise ConfigError(
            f"{what} has a dimension of size {dim} that mesh axes {names} (size {ways}) do "
            f"not divide; change the mesh sizes or the rule for that axis in mesh.rules"
        )

  def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, self.named(axes))

  def tree(self, axes: dict, shapes=None, what: str = "parameter") -> dict:
    """Shardings for a tree of logical axes; with shapes, first check the mesh divides each."""
    if shapes is not None:
      jax.tree_util.tree_map_with_path(
          lambda path, a, s: self.check_divides(
              f"{what} {jax.tree_util.keystr(path, simple=True, separator='/')} of shape "
              f"{tuple(s.shape)} (axes {a})", s.shape, a),
          axes, shapes, is_leaf=is_axes)
    return jax.tree.map(self.named, axes, is_leaf=is_axes)


def is_axes(x) -> bool:
  """A leaf of a logical-axes tree: a tuple of axis names (None = not sharded)."""
  return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def logical_axes(state: nnx.State) -> dict:
  """Pure dict of every variable's logical axes; stacked layers get a leading 'layers' axis."""
  flat = {}
  for path, var in nnx.to_flat_state(state):
    axes = tuple(var.get_metadata().get("axes") or ())
    ndim = len(var.shape)
    if ndim == len(axes) + 1:
      axes = ("layers",) + axes
    if ndim != len(axes):
      raise ValueError(f"variable {'/'.join(map(str, path))} has no logical axes for all dims")
    flat[path] = axes
  return nnx.traversals.unflatten_mapping(flat)
