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
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def _default_rules() -> dict[str, list[str]]:
  return {
      # parameters
      "vocab": ["tensor"],
      "embed": ["fsdp"],
      "heads": ["tensor"],
      "kv_heads": ["tensor"],
      "head_dim": [],
      "mlp": ["tensor"],
      "norm": [],
      "layers": [],
      "vision_embed": [],
      "vision_mlp": [],
      "vision_heads": [],
      "patch": [],
      # activations
      "act_batch": ["data", "fsdp"],
      "act_length": [],
      "act_embed": [],
      "act_heads": ["tensor"],
      "act_kv_heads": ["tensor"],
      "act_mlp": ["tensor"],
      "act_vocab": ["tensor"],
  }


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape (-1 fills the remaining devices) and the logical-axis rules."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  rules: dict[str, list[str]] = dataclasses.field(default_factory=_default_rules)

  def __post_init__(self):
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1:
      raise ValueError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    for name, size in zip(MESH_AXES, sizes):
      if size == 0 or size < -1:
        raise ValueError(f"mesh.{name} must be a positive size or -1, got {size}")
    for logical, axes in self.rules.items():
      unknown = [a for a in axes if a not in MESH_AXES]
      if unknown:
        raise ValueError(
            f"mesh.rules.{logical} names unknown mesh axes {unknown}; use {list(MESH_AXES)}"
        )

  def shape(self, num_devices: int) -> dict[str, int]:
    sizes = dict(zip(MESH_AXES, (self.data, self.fsdp, self.tensor)))
    known = math.prod(s for s in sizes.values() if s != -1)
    for name, size in sizes.items():
      if size == -1:
        if num_devices % known:
          raise ValueError(
              f"mesh.{name}=-1 cannot fill {num_devices} devices: the other axes multiply to "
              f"{known}, which does not divide {num_devices}"
          )
        sizes[name] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
      raise ValueError(
          f"mesh {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are "
          "available; set one of mesh.data/fsdp/tensor to -1 or change the sizes"
      )
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = cfg.shape(len(devices))
  grid = np.asarray(devices).reshape(tuple(sizes.values()))
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
        raise ValueError(f"logical axis {name!r} has no rule; add mesh.rules.{name}=[...]")
      mesh_axes = tuple(a for a in table[name] if a not in used and self.mesh.shape[a] > 1)
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
        raise ValueError(
            f"{what} has a dimension of size {dim} that mesh axes {names} (size {ways}) do "
            f"not divide; change the mesh sizes or the rule for that axis in mesh.rules"
        )

  def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, self.named(axes))
