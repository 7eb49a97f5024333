"""The device mesh and the shardings every train step declares (STYLE.md: jit over a Mesh).

The batch is split along the mesh's ``data`` axis; parameters and optimizer states are
replicated (FSDP sharding is a later issue). Steps never mention devices: they receive these
shardings once, at ``jax.jit`` time.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


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


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the ``data`` axis, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec("data"))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"]


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays split over ``data`` (correct on many hosts too)."""
  sharding = batch_sharding(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in batch.items()}


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
  size = data_parallel_size(mesh)
  if batch_size % size:
    raise ValueError(f"config.{field}={batch_size} is not divisible by the {size} devices of the "
                     f"mesh's data axis; use a multiple of {size}.")


def tree_shardings(tree: Any, sharding: NamedSharding) -> Any:
  return jax.tree.map(lambda _: sharding, tree)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct``s carrying shardings: what a checkpoint restores onto."""
  return jax.tree.map(
      lambda leaf, spec: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=spec),
      abstract, shardings)
