"""The device mesh and the shardings every train step declares (STYLE.md: jit over a Mesh).

The mesh has a ``data`` and an ``fsdp`` axis. The batch is split over both. Parameters,
optimizer states and EMA copies are either replicated or, with ``config.mesh.param_sharding =
'fsdp'``, split along ``fsdp`` on their largest divisible dimension (ZeRO-3 style: XLA gathers a
layer's weights where it is used and reduce-scatters its gradients). Steps never mention
devices: they receive these shardings once, at ``jax.jit`` time. A checkpoint stores global
arrays, so one saved on one mesh restores onto any other (Orbax reshards on restore).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vqvdm_jax import config as config_lib


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
  """A mesh of ``mesh_config.shape`` (-1: the remaining devices) with Auto axis types.

  Auto axes keep ordinary linen code (edge padding of a batch-sharded video) legal; jax 0.10's
  default Explicit axes would reject it.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_config.shape)
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh.shape={tuple(shape)}: at most one axis may be -1.")
  known = int(np.prod([size for size in shape if size != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"config.mesh.shape={tuple(shape)}: {len(devices)} devices do not divide "
                       f"into axes of size {known}.")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"config.mesh.shape={tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"found {len(devices)}; use -1 for the axis that takes the rest.")
  device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, tuple(mesh_config.axes),
              axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


BATCH_AXES = ("data", "fsdp")
PARAM_SHARDINGS = ("replicated", "fsdp")


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the ``data`` and ``fsdp`` axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(_batch_axes(mesh)))


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch is split: every device of the batch axes holds a different slice."""
  return int(np.prod([mesh.shape[axis] for axis in _batch_axes(mesh)]))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2 ** 12) -> PartitionSpec:
  """Split the largest dimension ``fsdp_size`` divides; small or indivisible arrays replicate.

  Arrays under ``min_size`` elements (biases, norms, scalars) are not worth a collective.
  """
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return PartitionSpec()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      return PartitionSpec(*([None] * dim + ["fsdp"]))
  return PartitionSpec()


def state_shardings(abstract_state: Any, mesh: Mesh, param_sharding: str,
                    fsdp_min_size: int = 2 ** 12) -> Any:
  """Shardings for a whole train state: params, optimizer moments and EMA copies alike.

  Each leaf's sharding depends only on its shape, so a parameter, its Adam moments and its EMA
  copy always agree and the optimizer update needs no communication.
  """
  if param_sharding not in PARAM_SHARDINGS:
    raise ValueError(f"config.mesh.param_sharding={param_sharding!r} is not one of "
                     f"{PARAM_SHARDINGS}.")
  fsdp_size = mesh.shape.get("fsdp", 1) if param_sharding == "fsdp" else 1
  return jax.tree.map(
      lambda leaf: NamedSharding(mesh, fsdp_spec(leaf.shape, fsdp_size, fsdp_min_size)),
      abstract_state)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays split over ``data`` (correct on many hosts too)."""
  sharding = batch_sharding(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in batch.items()}


def from_replicated_host_data(tree: Any, sharding: NamedSharding) -> Any:
  """Host arrays that every process holds whole and identical -> global arrays of ``sharding``.

  For what each process computes or reads the same (seeded conditioning, an evaluation batch
  every host read, pretrained weights): each process places only its own devices' slices, so it
  is right on many hosts, where ``jit`` rejects numpy inputs to shardings that split them.
  :func:`shard_batch` is the other case: each process holds only its own rows.
  """
  def place(value: Any) -> jax.Array:
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(place, tree)


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
  size = data_parallel_size(mesh)
  if batch_size % size:
    raise config_lib.ConfigError(
        f"config.{field}={batch_size} is not divisible by the {size} devices of the mesh's data "
        f"axis; use a multiple of {size}.")


def tree_shardings(tree: Any, sharding: NamedSharding) -> Any:
  return jax.tree.map(lambda _: sharding, tree)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct``s carrying shardings: what a checkpoint restores onto."""
  return jax.tree.map(
      lambda leaf, spec: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=spec),
      abstract, shardings)
