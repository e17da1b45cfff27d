"""The platform a computation is traced for, which need not be the host's.

Every choice that depends on the accelerator (which Pallas driver, whether Mosaic GPU's wgmma
kernels apply, cuDNN attention) asks here rather than `jax.default_backend()`, so that an
abstract device set with `jax.sharding.use_abstract_mesh` retargets all of them at once. That is
how a model is lowered for a TPU on a CPU host (`jax.export(..., platforms=["tpu"])` inside
`use_abstract_mesh(AbstractMesh(..., abstract_device=AbstractDevice("TPU v5 lite", 1, "tpu")))`):
the kernels are then traced with the TPU driver, as on the TPU itself. Without an abstract
device both answers are the default device's.
"""

import jax


def _abstract_device():
  return jax.sharding.get_abstract_mesh().abstract_device


def target_platform() -> str:
  """"cpu", "gpu" or "tpu": the abstract mesh's device platform, else the default backend."""
  device = _abstract_device()
  return device.platform if device is not None else jax.default_backend()


def target_device_kind() -> str:
  """The target device's kind ("NVIDIA H100 80GB HBM3", "TPU v5 lite", ...)."""
  device = _abstract_device()
  return device.device_kind if device is not None else jax.devices()[0].device_kind


def target_core_count() -> int | None:
  """The target device's cores (an NVIDIA GPU's SMs; None where JAX does not say)."""
  device = _abstract_device()
  if device is not None:
    return device.num_cores
  return getattr(jax.devices()[0], "core_count", None)


def target_memory_bytes() -> int | None:
  """The target device's memory limit for JAX's arrays (`bytes_limit`), read from this host's
  first device when the target is that kind of device (a mesh of this host's devices sets an
  abstract device too); None where JAX does not say (CPU) or the target is another device (a
  TPU lowered on a CPU host)."""
  device = _abstract_device()
  local = jax.devices()[0]
  if device is not None and device.device_kind != local.device_kind:
    return None
  stats = local.memory_stats() or {}
  return stats.get("bytes_limit")
