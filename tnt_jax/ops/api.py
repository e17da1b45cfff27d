"""The one entry point of the deep-memory op: validation, then the chosen implementation.

    out_BxTxHxD, final_state = memory_op(q, k, v, gates, state, slow, config,
                                         implementation="xla")

q, k, v: [batch, time, heads, head_dim], one dtype (float32, bfloat16 or float64); matmuls run in
  that dtype, accumulation and the recurrent state in float32 (float64 for float64 inputs).
gates: `Gates(theta, eta, alpha)`, each [batch, time, heads]; which ones a rule needs:
  gd -> theta; titans -> theta, eta, alpha; lact -> theta (+ eta with momentum).
state: `MemoryState(weights, momentum)` with leaves [batch, heads, ...]; `config.init_state`
  builds it from the learned W_init. The returned state continues a stream: calling the op on
  x[:, :T1] then on x[:, T1:] with the carried state equals one call when T1 is a multiple of
  chunk_size (chunks are counted from each call's first token).
slow: the model's slow parameters ({} unless residual_norm), leaves [heads, head_dim].
implementation: "reference" (token loop, the oracle) | "xla" (chunkwise-parallel) | "affine" (a
  linear memory's chunks composed as affine maps by an associative scan, ops/affine.py: log-depth
  instead of one step per chunk; other memories run the xla path and the reason is logged once)
  | "pallas" (the fused kernel, tnt_jax/kernels/chunk_memory.py, on GPU and TPU; where it
  cannot run this op -- model, rule, dtype, shape or platform -- the xla path runs instead and
  the reason is logged once) | "pallas_interpret" (the same kernel body interpreted, on any
  backend: for tests). Under a mesh set with `jax.set_mesh` (the trainer sets its own), the kernel
  runs in `jax.shard_map` with the batch rows split over the mesh's automatically partitioned
  axes (`kernel_mesh_axes`): XLA cannot partition a Pallas call itself.
A length that is not a multiple of chunk_size is fine: the last chunk is shorter.
"""

from __future__ import annotations

import functools
import math

from absl import logging
import jax
import jax.numpy as jnp

from tnt_jax.kernels import chunk_memory
from tnt_jax.memory.config import MemoryConfig
from tnt_jax.memory.reference import reference_memory
from tnt_jax.memory.rules import Gates, MemoryState
from tnt_jax.ops import affine
from tnt_jax.ops.chunkwise import chunkwise_memory
from tnt_jax.platform import target_platform

Array = jax.Array
IMPLEMENTATIONS = ("reference", "xla", "affine", "pallas", "pallas_interpret")


def _shape_of(x):
  return tuple(x.shape)


def validate_memory_inputs(q, k, v, gates: Gates, state: MemoryState, slow: dict,
                           config: MemoryConfig) -> None:
  """Raise ValueError naming the offending value; runs on shapes only, before any tracing."""
  if not isinstance(config, MemoryConfig):
    raise ValueError(f"config must be a MemoryConfig, got {type(config).__name__}")
  if q.ndim != 4:
    raise ValueError(f"q must be [batch, time, heads, head_dim], got shape {_shape_of(q)}")
  for name, x in (("k", k), ("v", v)):
    if x.shape != q.shape:
      raise ValueError(f"{name}.shape={_shape_of(x)} must equal q.shape={_shape_of(q)}")
    if x.dtype != q.dtype:
      raise ValueError(f"{name}.dtype={x.dtype} must equal q.dtype={q.dtype}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q.dtype={q.dtype} must be a floating type")
  batch, length, heads, head_dim = q.shape
  if length < 1:
    raise ValueError(f"sequence length={length} must be >= 1")
  gate_shape = (batch, length, heads)
  needed = config.rule.required_gates()
  for name in ("theta", "eta", "alpha"):
    g = getattr(gates, name)
    if name in needed and g is None:
      raise ValueError(f"rule={config.rule.kind!r} needs gate {name}; got None")
    if name not in needed and g is not None:
      raise ValueError(f"rule={config.rule.kind!r} (momentum={config.rule.has_momentum}) does "
                       f"not use gate {name}; pass None")
    if g is not None and tuple(g.shape) != gate_shape:
      raise ValueError(f"gate {name}.shape={_shape_of(g)} must be [batch, time, heads]="
                       f"{gate_shape}")
    if g is not None and not jnp.issubdtype(g.dtype, jnp.floating):
      raise ValueError(f"gate {name}.dtype={g.dtype} must be a floating type")
  shapes = config.model.layer_shapes(head_dim)
  if set(state.weights) != set(shapes):
    raise ValueError(f"state weights have layers {sorted(state.weights)}, but model "
                     f"{config.model.kind!r} has {sorted(shapes)}")
  for layer, (out_dim, in_dim) in shapes.items():
    want = {"w": (batch, heads, out_dim, in_dim)}
    if config.model.bias:
      want["b"] = (batch, heads, out_dim)
    got = {leaf: _shape_of(x) for leaf, x in state.weights[layer].items()}
    if got != want:
      raise ValueError(f"state weights[{layer!r}] shapes {got} must be {want} "
                       f"(batch={batch}, heads={heads}, head_dim={head_dim})")
  if config.rule.has_momentum:
    if state.momentum is None:
      raise ValueError(f"rule={config.rule.kind!r} carries momentum but state.momentum is None; "
                       "build the state with config.init_state")
    momentum_shapes = jax.tree.map(_shape_of, state.momentum)
    weight_shapes = jax.tree.map(_shape_of, state.weights)
    if momentum_shapes != weight_shapes:
      raise ValueError(f"state.momentum shapes {momentum_shapes} must equal state.weights "
                       f"shapes {weight_shapes}")
  elif state.momentum is not None:
    raise ValueError(f"rule={config.rule.kind!r} has no momentum but state.momentum is set")
  want_slow = jax.tree.map(_shape_of, config.model.init_slow_params(heads, head_dim))
  if jax.tree.map(_shape_of, dict(slow)) != want_slow:
    raise ValueError(f"slow params shapes {jax.tree.map(_shape_of, dict(slow))} must be "
                     f"{want_slow} for this model")


def memory_op(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, gates: Gates,
              state: MemoryState, slow: dict | None, config: MemoryConfig, *,
              implementation: str = "xla", remat: bool = False, unroll: int | None = None,
              kernel_blocks: chunk_memory.KernelBlocks | None = None
              ) -> tuple[Array, MemoryState]:
  """Run a deep test-time memory over a sequence; returns (outputs [B,T,H,D], final state).

  remat: recompute each chunk's forward in the backward pass (less memory, ~1/3 more compute).
  unroll: chunks per trip of the scan over chunks; None picks one (chunkwise.default_unroll).
  remat and unroll shape the xla path; the kernel always recomputes a chunk in its backward.
  kernel_blocks: the kernel's launch and checkpoint settings (None: KernelBlocks()), for
    implementation="pallas" / "pallas_interpret".
  """
  slow = {} if slow is None else slow
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is unknown; expected one of "
                     f"{IMPLEMENTATIONS}")
  if unroll is not None and (not isinstance(unroll, int) or isinstance(unroll, bool)
                             or unroll < 1):
    raise ValueError(f"unroll={unroll!r} must be an integer >= 1")
  validate_memory_inputs(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates, state, slow, config)
  if implementation == "reference":
    return reference_memory(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates, state, slow, config)
  if implementation.startswith("pallas"):
    interpret = implementation == "pallas_interpret"
    blocks = kernel_blocks or chunk_memory.KernelBlocks()
    reason = kernel_fallback_reason(config, q_BxTxHxD.shape[-1], q_BxTxHxD.dtype, interpret,
                                    blocks)
    axes = kernel_mesh_axes()
    if reason is None:
      reason = _mesh_split_reason(q_BxTxHxD.shape[0], axes)
    if reason is None:
      kernel = functools.partial(chunk_memory.kernel_memory, config=config, interpret=interpret,
                                 blocks=blocks)
      return _rows_per_device(kernel, axes, q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates, state)
    _log_fallback(implementation, reason)
  if implementation == "affine":
    reason = affine.unsupported_reason(config)
    if reason is None:
      return affine.affine_memory(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates, state, slow, config)
    _log_fallback(implementation, reason)
  return chunkwise_memory(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates, state, slow, config,
                          remat=remat, unroll=unroll)


def kernel_fallback_reason(config: MemoryConfig, head_dim: int, dtype, interpret: bool,
                           blocks: chunk_memory.KernelBlocks | None = None) -> str | None:
  """Why implementation="pallas" would run the xla path for this op (None: the kernel runs)."""
  platform = target_platform()
  driver = chunk_memory.PLATFORM_DRIVER.get(platform)
  if driver is None and not interpret:
    return f"platform={platform!r} has no compiled Pallas kernel (GPU and TPU do)"
  return chunk_memory.unsupported_reason(config, head_dim, dtype,
                                         driver=driver or "sequential_grid", interpret=interpret,
                                         blocks=blocks or chunk_memory.KernelBlocks())


def kernel_mesh_axes() -> tuple[str, ...]:
  """The axes of the current mesh (`jax.set_mesh`) that XLA partitions automatically and that
  have more than one device: the kernel's batch rows are split over them. Axes already manual
  (inside a shard_map, e.g. context parallelism's) are left alone."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  return tuple(name for name in mesh.axis_names
               if mesh.shape[name] > 1 and name not in mesh.manual_axes)


def _mesh_split_reason(batch: int, axes: tuple[str, ...]) -> str | None:
  mesh = jax.sharding.get_abstract_mesh()
  devices = math.prod(mesh.shape[name] for name in axes)
  if batch % devices:
    return (f"the op's {batch} batch rows do not split over mesh axes {axes} ({devices} "
            "devices); the kernel runs each device's rows in shard_map")
  return None


def _rows_per_device(kernel, axes, q, k, v, gates, state):
  """kernel(q, k, v, gates, state) with every leaf's leading (batch) axis split over the mesh
  axes `axes` (`kernel_mesh_axes()`): a Pallas call is opaque to XLA's partitioner (Mosaic TPU refuses to
  be partitioned; a GPU kernel call is a custom call the partitioner does not know how to
  split), and its rows are independent, so each device runs the kernel on its own rows."""
  if not axes:
    return kernel(q, k, v, gates, state)
  mesh = jax.sharding.get_abstract_mesh()
  rows = jax.sharding.PartitionSpec(axes)       # a prefix: every leaf of each argument
  # Every axis not already manual goes manual, size-1 ones too: Mosaic TPU refuses a kernel
  # under any automatically partitioned axis.
  manual = set(mesh.axis_names) - set(mesh.manual_axes)
  return jax.shard_map(kernel, in_specs=(rows,) * 5, out_specs=rows, axis_names=manual,
                       check_vma=False)(q, k, v, gates, state)


@functools.lru_cache(maxsize=None)
def _log_fallback(implementation: str, reason: str) -> None:
  logging.warning("memory_op(implementation=%r): running the xla path instead: %s",
                  implementation, reason)
