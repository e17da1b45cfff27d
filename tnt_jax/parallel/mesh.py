"""The training mesh (`data`, `fsdp`, `context` axes) and the shardings of batches and parameters.

Batch rows are split over `data` and `fsdp`; the sequence dimension over `context` (context
parallelism, tnt_jax/parallel/context.py: each device holds a contiguous slice of every
sequence). Parameters are replicated over `data` and `context` and, when fsdp > 1, each is split
over `fsdp` along its largest axis that the fsdp size divides (small or indivisible ones stay
replicated); XLA inserts the gathers.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "context")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(data: int, fsdp: int, num_devices: int, context: int = 1
               ) -> tuple[int, int, int]:
  """Resolve -1 (fill the remaining devices) and check the product against the devices."""
  sizes = {"data": data, "fsdp": fsdp, "context": context}
  shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {shown}")
  for name, size in sizes.items():
    if size != -1 and (not isinstance(size, int) or size < 1):
      raise ValueError(f"mesh {name}={size!r} must be an integer >= 1 or -1")
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide over the fixed mesh axes "
                       f"({shown})")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError("mesh " + " x ".join(f"{k}={v}" for k, v in sizes.items() if
                                          k != "context" or v != 1) +
                     f" must use all {num_devices} devices")
  return sizes["data"], sizes["fsdp"], sizes["context"]


def make_mesh(data: int = -1, fsdp: int = 1, context: int = 1, devices=None
              ) -> jax.sharding.Mesh:
  """devices: None for this process's (all of jax.devices()), or e.g. a TPU topology's
  (tnt_jax/aot.py)."""
  shape = mesh_shape(data, fsdp, jax.device_count() if devices is None else len(devices), context)
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Rows over data x fsdp, the sequence over context."""
  return NamedSharding(mesh, P(BATCH_AXES, "context"))


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
