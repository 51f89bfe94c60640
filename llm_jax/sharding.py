"""The device mesh (axes data, fsdp, tensor), the one logical→mesh rule table, and placement checks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import Mapping
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax import errors

MESH_AXES = ("data", "fsdp", "tensor")

# The only place where logical names meet mesh axes. Parameters shard their 'embed' dimension
# over fsdp (ZeRO-3 style) and their head/MLP/vocab dimensions over tensor; activations shard
# their batch over (data, fsdp) and their head/MLP/vocab dimensions over tensor. With several slices
# (make_mesh's num_slices) the data axis spans them, so the batch splits across slices and parameters,
# sharded over fsdp and tensor only, are whole in each slice: only gradients cross the slower DCN.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("positions", None),
    ("layers", None),
)


# Where a batch's rows go: the mesh axes the logical rule 'batch' names (one rule; the placement helpers below and the
# micro-batch constraint in llm_jax.steps read it from here).
BATCH_AXES: tuple[str, ...] = dict(LOGICAL_RULES)["batch"]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The mesh's axis sizes, as the experiment config's mesh section gives them (the one table of their defaults)."""

  data: int = -1  # Pure data parallelism by default; -1 means "the remaining devices".
  fsdp: int = 1  # Parameter and optimizer-state sharding (ZeRO-3 style); also splits the batch.
  tensor: int = 1  # Tensor (model) parallelism over heads and the MLP hidden width.

  @property
  def requested(self) -> tuple[int, int, int]:
    """(data, fsdp, tensor) in MESH_AXES order, for `make_mesh`."""
    return self.data, self.fsdp, self.tensor


def resolve_mesh_shape(requested: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills a single -1 with 'the rest' and checks the product equals the device count."""
  sizes = list(requested)
  names = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise errors.MeshError(f"mesh has more than one -1 ({names}); set all but one axis to a size")
  if any(s == 0 or s < -1 for s in sizes):
    raise errors.MeshError(f"mesh sizes must be positive or -1 ({names})")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise errors.MeshError(f"mesh ({names}) does not divide the {num_devices} devices; make the product of the "
                             f"fixed axes divide {num_devices}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise errors.MeshError(f"mesh ({names}) needs {math.prod(sizes)} devices but {num_devices} are present; change "
                           f"the mesh sizes so their product is {num_devices} (or use -1 for one axis)")
  return tuple(sizes)


def make_mesh(requested: Sequence[int], devices: Sequence[jax.Device] | None = None, num_slices: int = 1) -> Mesh:
  """A mesh with Auto axes: parameters and activations are annotated and XLA propagates the rest.

  With `num_slices` > 1 the data axis spans the slices: its outer factor crosses the data-center network (DCN) and
  the rest of the mesh stays inside each slice's ICI, as `mesh_utils.create_hybrid_device_mesh` lays it out, so only
  the data-parallel gradient reduction crosses slices. TPU devices (real or libtpu's compile-only ones) are laid out
  along the torus.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(requested, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  found = len({getattr(d, "slice_index", 0) for d in devices})
  if num_slices > 1 or found > 1:
    return Mesh(_hybrid_devices(shape, devices, num_slices, found), MESH_AXES, axis_types=axis_types)
  if devices[0].platform == "tpu":
    return Mesh(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True), MESH_AXES,
                axis_types=axis_types)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def _hybrid_devices(shape: tuple[int, ...], devices: list[jax.Device], num_slices: int, found: int) -> np.ndarray:
  """The devices of a several-slice mesh: data = num_slices (DCN) x data / num_slices (ICI)."""
  if found != num_slices:
    raise errors.MeshError(f"num_slices={num_slices} but the devices span {found} slice(s); set "
                           f"--config.num_slices={found}")
  data, fsdp, tensor = shape
  if data % num_slices:
    raise errors.MeshError(f"mesh.data={data} does not divide over num_slices={num_slices}: slices join along the "
                           "data axis (fsdp and tensor stay inside a slice); make mesh.data a multiple of "
                           f"{num_slices}")
  return mesh_utils.create_hybrid_device_mesh((data // num_slices, fsdp, tensor), (num_slices, 1, 1), devices,
                                              allow_split_physical_axes=True)


def logical_to_mesh_specs(logical_tree: Any) -> Any:
  """PartitionSpecs of logical axis names under LOGICAL_RULES (duplicate mesh axes dropped)."""
  return nn.logical_to_mesh(logical_tree, LOGICAL_RULES)


def param_shardings(abstract_boxed_params: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of boxed (logically partitioned) abstract parameters."""
  logical = nn.get_partition_spec(abstract_boxed_params)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), logical_to_mesh_specs(logical),
                      is_leaf=lambda x: isinstance(x, P))


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings`: restore and compile targets for the *current* mesh."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def data_parallel_size(mesh_shape: Mapping[str, int]) -> int:
  """How many ways a batch splits over a mesh of `mesh_shape` (axis name to size): the product of BATCH_AXES."""
  return math.prod(mesh_shape[axis] for axis in BATCH_AXES)


def batch_spec(leading: int = 0) -> P:
  """A batch array's placement: its row dimension, after `leading` unsplit ones (micro-batches), over BATCH_AXES;
  every other dimension replicated."""
  return P(*([None] * leading), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """A host batch's placement on `mesh`: rows over BATCH_AXES (`batch_spec`)."""
  return NamedSharding(mesh, batch_spec())


def global_batch(local_batch: dict[str, np.ndarray], batch_sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles the global batch from each process's own rows."""
  def one(x):
    global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding, x, global_shape)
  return {k: one(v) for k, v in local_batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_divisible(abstract_params: Any, shardings: Any, mesh: Mesh) -> None:
  """Refuses parameter dimensions that do not divide over their mesh axes, naming the first one."""
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat_params, flat_shardings):
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      size = math.prod(mesh.shape[a] for a in axes)
      if dim % size:
        name = jax.tree_util.keystr(path)
        raise errors.MeshError(f"parameter {name} of shape {leaf.shape} has a dimension {dim} that does not divide "
                               f"over mesh axes {axes} of size {size}; change mesh.{axes[0]} or the model dimension")


def replicated_fraction(abstract_params: Any, shardings: Any) -> float:
  """Share of parameter bytes that every device holds a full copy of."""
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  total = replicated_bytes = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract_params), flat_shardings):
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    total += nbytes
    if sharding.is_fully_replicated:
      replicated_bytes += nbytes
  return replicated_bytes / max(total, 1)


def check_replication(abstract_params: Any, shardings: Any, mesh: Mesh, tolerance: float) -> float:
  """Refuses a model-parallel mesh that leaves more than `tolerance` of parameter bytes on every device.

  Pure data parallelism replicates everything by choice, so it is not checked.
  """
  share = replicated_fraction(abstract_params, shardings)
  if mesh.shape["fsdp"] * mesh.shape["tensor"] > 1 and share > tolerance:
    raise errors.MeshError(f"{100 * share:.1f}% of parameter bytes would be fully replicated on mesh "
                           f"{dict(mesh.shape)}, above max_replicated_share={tolerance}; check LOGICAL_RULES in "
                           "llm_jax/sharding.py or raise --config.max_replicated_share")
  return share


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, params_sh: Any) -> Any:
  """Each optimizer-state leaf sharded like the parameter it shadows, found by path and shape.

  A leaf shadows a parameter when the dict keys ending its path are that parameter's path and the shapes
  agree. This works where `optax.tree_map_params` cannot (partitioned or masked states such as Muon's,
  which cannot be initialised on a placeholder); the rest (counts, Adafactor's factored row and column
  statistics, which are small) is replicated.
  """
  def keys(path: tuple[Any, ...]) -> tuple[str, ...]:
    trailing = []
    for entry in reversed(path):
      if not isinstance(entry, jax.tree_util.DictKey):
        break
      trailing.append(str(entry.key))
    return tuple(reversed(trailing))

  first = jax.tree.leaves(params_sh)[0]
  replicated_sh = replicated(first.mesh) if isinstance(first, NamedSharding) else first  # one device: itself
  by_path = {keys(path): (leaf.shape, sh) for (path, leaf), sh in
             zip(jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(params_sh))}

  def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
    shape, sh = by_path.get(keys(path), (None, replicated_sh))
    return sh if shape == leaf.shape else replicated_sh

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)
