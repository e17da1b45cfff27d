"""Compiling for a TPU on a host without one: libtpu's compile-only client.

libtpu, the TPU runtime that `pip install "jax[tpu]"` installs, compiles for a named TPU topology
("v5e:2x2", "v6e:2x2", "v5p:2x2x1", ...) without TPU hardware. `tpu_mesh` builds a mesh over
that topology's devices; a function jitted with shardings on it and lowered with
`jax.ShapeDtypeStruct` arguments compiles exactly as it would on the TPU, so every Pallas kernel
goes through libtpu's Mosaic compiler (layouts, tiling, VMEM), and XLA reports the per-device
memory and FLOPs of the step. Nothing runs. The mesh also retargets the platform the kernels are
traced for (`tnt_jax.platform`), so `implementation="pallas"` picks the TPU driver.

Where no TPU is attached, libtpu's runtime start-up is skipped for ordinary use by
`JAX_PLATFORMS=cpu`; several processes opening compile-only clients at once need
`ALLOW_MULTIPLE_LIBTPU_LOAD=1` (libtpu's lock file is for processes sharing TPU chips). The test
suite and experiments/tpu_compile.py set both.
"""

from __future__ import annotations

import importlib.util
import math
import os

import jax
import numpy as np


def libtpu_missing_reason() -> str | None:
  """Why this host cannot compile for a TPU (None where libtpu is installed)."""
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    return ('libtpu is not installed: pip install "jax[tpu]" (Linux x86-64) compiles for TPUs '
            "on any host")
  return None


def tpu_devices(topology: str) -> list:
  """The devices of a TPU topology such as "v5e:2x2" (generation:chips per dimension)."""
  reason = libtpu_missing_reason()
  if reason is not None:
    raise RuntimeError(reason)
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(topology, "tpu").devices)
  except Exception as error:   # libtpu's own message names what it could not parse
    raise ValueError(f"topology={topology!r} is not a TPU topology libtpu can compile for "
                     f"(e.g. 'v5e:2x2', 'v6e:2x2', 'v5p:2x2x1'): {error}") from error


def tpu_mesh(topology: str, shape: tuple[int, ...], axis_names: tuple[str, ...],
             axis_types=None) -> jax.sharding.Mesh:
  """A mesh of `shape` over the first prod(shape) devices of `topology`."""
  devices = tpu_devices(topology)
  count = math.prod(shape)
  if count > len(devices):
    raise ValueError(f"mesh shape {shape} needs {count} devices; topology={topology!r} has "
                     f"{len(devices)}")
  axis_types = axis_types or (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.sharding.Mesh(np.array(devices[:count]).reshape(shape), axis_names,
                           axis_types=axis_types)


def kernel_calls(compiled) -> int:
  """How many Pallas (Mosaic TPU) kernel calls a compiled TPU executable makes."""
  return compiled.as_text().count('custom_call_target="tpu_custom_call"')


def train_step_for_tpu(config, topology: str):
  """The training step of `config` (configs/tnt_lm.py's fields), lowered and compiled for the
  devices of `topology` with the mesh config.mesh describes over them. Returns (compiled, mesh).
  Checks the batch and sequence split before compiling, as the trainer does."""
  from tnt_jax.parallel import mesh as mesh_lib
  from tnt_jax.train import trainer
  data_cfg, _, model_config, mesh = trainer.checked_setup(config, tpu_devices(topology))
  parts = trainer.train_parts(config, model_config, mesh)
  rows = mesh_lib.batch_sharding(mesh)
  batch_shape = (data_cfg.batch_size, data_cfg.seq_len)
  batch = {name: jax.ShapeDtypeStruct(batch_shape, dtype, sharding=rows) for name, dtype in
           (("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
            ("segment_ids", np.int32), ("positions", np.int32))}
  with jax.set_mesh(mesh):
    return parts.train_step.lower(parts.abstract_state, batch).compile(), mesh
