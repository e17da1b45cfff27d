"""The training mesh (`data`, `fsdp` axes) and the shardings of batches and parameters.

Batches are split over both axes (every device holds a slice of the batch). Parameters are
replicated over `data` and, when fsdp > 1, each is split over `fsdp` along its largest axis that
the fsdp size divides (small or indivisible ones stay replicated); XLA inserts the gathers.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """Resolve -1 (fill the remaining devices) and check the product against the devices."""
  sizes = {"data": data, "fsdp": fsdp}
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}")
  for name, size in sizes.items():
    if size != -1 and (not isinstance(size, int) or size < 1):
      raise ValueError(f"mesh {name}={size!r} must be an integer >= 1 or -1")
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide over the fixed mesh axes "
                       f"(data={data}, fsdp={fsdp})")
    sizes[fill[0]] = num_devices // known
  if sizes["data"] * sizes["fsdp"] != num_devices:
    raise ValueError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} must use all "
                     f"{num_devices} devices")
  return sizes["data"], sizes["fsdp"]


def make_mesh(data: int = -1, fsdp: int = 1) -> jax.sharding.Mesh:
  shape = mesh_shape(data, fsdp, jax.device_count())
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXES))


def check_batch_divides(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % devices:
    raise ValueError(f"batch_size={batch_size} does not divide over the mesh's {devices} "
                     f"devices (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")


def param_sharding(shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> NamedSharding:
  fsdp = mesh.shape["fsdp"]
  spec = [None] * len(shape)
  if fsdp > 1:
    divisible = [i for i, n in enumerate(shape) if n % fsdp == 0 and n >= fsdp]
    if divisible:
      spec[max(divisible, key=lambda i: shape[i])] = "fsdp"
  return NamedSharding(mesh, P(*spec))
