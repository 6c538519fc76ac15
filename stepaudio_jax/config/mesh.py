"""The `mesh` section: mesh shape and the logical-axis rules (parallel/mesh.py applies them)."""

import dataclasses
import math

# Outer to inner: tensor changes fastest across neighbouring devices (its collectives are in every
# matmul), sequence next (the all-to-alls around attention).
MESH_AXES = ("data", "fsdp", "sequence", "tensor")


def _default_rules() -> dict[str, list[str]]:
  return {
      # parameters
      "vocab": ["tensor"],
      "embed": ["fsdp", "sequence"],  # the sequence axis also shards parameters, like fsdp
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
      "act_length": ["sequence"],
      "act_embed": [],
      "act_heads": ["tensor"],
      "act_kv_heads": ["tensor"],
      "act_mlp": ["tensor"],
      "act_vocab": ["tensor"],
      # inside attention (sequence parallelism: the whole sequence, a share of the heads)
      "act_attn_heads": ["tensor", "sequence"],
      "act_attn_kv_heads": ["tensor", "sequence"],
  }


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape (-1 fills the remaining devices) and the logical-axis rules.

  data, fsdp, sequence and tensor are whole axis sizes. sequence splits each row's tokens
  between devices outside attention and the heads inside it (all-to-all in between, as in
  DeepSpeed-Ulysses) and shards parameters like fsdp, so a batch of fewer rows than chips
  still uses every chip; tensor x sequence must divide the kv heads.

  On several slices (TPU multislice) or nodes, dcn_data and dcn_fsdp say how many ways of that
  axis go across them over the data-center network (DCN); the rest of each axis stays within a
  slice on ICI (parallel/mesh.py builds the hybrid mesh). Their product must be the number of
  slices (or processes, where devices have no slice index, as on GPU clusters); 1 and 1: the
  plain reshape of the device list.
  """

  data: int = 1
  fsdp: int = -1
  sequence: int = 1
  tensor: int = 1
  dcn_data: int = 1  # ways of mesh.data across slices (the gradient all-reduce tolerates DCN)
  dcn_fsdp: int = 1  # ways of mesh.fsdp across slices (its all-gathers are in every layer)
  rules: dict[str, list[str]] = dataclasses.field(default_factory=_default_rules)

  def __post_init__(self):
    sizes = [self.data, self.fsdp, self.sequence, self.tensor]
    if sizes.count(-1) > 1:
      raise ValueError("at most one of mesh.data, mesh.fsdp, mesh.sequence, mesh.tensor may be "
                       "-1")
    for name, size in zip(MESH_AXES, sizes):
      if size == 0 or size < -1:
        raise ValueError(f"mesh.{name} must be a positive size or -1, got {size}")
    if self.dcn_data < 1 or self.dcn_fsdp < 1:
      raise ValueError(f"mesh.dcn_data and mesh.dcn_fsdp must be >= 1, got {self.dcn_data} "
                       f"and {self.dcn_fsdp}")
    for logical, axes in self.rules.items():
      unknown = [a for a in axes if a not in MESH_AXES]
      if unknown:
        raise ValueError(
            f"mesh.rules.{logical} names unknown mesh axes {unknown}; use {list(MESH_AXES)}"
        )

  def shape(self, num_devices: int) -> dict[str, int]:
    sizes = dict(zip(MESH_AXES, (self.data, self.fsdp, self.sequence, self.tensor)))
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
          "available; set one of mesh.data/fsdp/sequence/tensor to -1 or change the sizes"
      )
    return sizes

  @property
  def dcn_ways(self) -> int:
    return self.dcn_data * self.dcn_fsdp

  def split(self, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(per-slice ICI shape, DCN shape) over MESH_AXES for num_devices in dcn_ways slices."""
    sizes = self.shape(num_devices)
    dcn = (self.dcn_data, self.dcn_fsdp, 1, 1)
    for name, ways in zip(MESH_AXES, dcn):
      if sizes[name] % ways:
        raise ValueError(f"mesh.dcn_{name}={ways} does not divide mesh.{name}={sizes[name]}: "
                         f"the axis is split into {ways} slices of mesh.{name}/{ways} devices")
    return tuple(sizes[a] // w for a, w in zip(MESH_AXES, dcn)), dcn
