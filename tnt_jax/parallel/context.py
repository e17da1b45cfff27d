"""Context parallelism: the TNT op with the sequence split over a mesh axis (jax.shard_map).

    out, global_state = context_parallel_tnt_op(q, k, v, gates, global_state, local_inits,
                                                slows, config, mesh, axis="context")

Device d of the `axis` holds tokens [d L, (d + 1) L) of every sequence, L = T / devices.

- Local memories: L must be a multiple of every local shard length S_L, so every shard lies on
  one device; each device runs its shards (reset to W_init, Q-K projection included) with no
  communication at all. This is why TNT resets its locals.
- Global memory: its state crosses device boundaries. Two hand-offs (`global_handoff`):
  "gather": each device all-gathers the sequence's q, k, v and global gates
  (activations of size T x d) and runs the global memory's chunk scan over the whole sequence
  itself, keeping its slice of the outputs; redundant scans, one collective each way.
  "chain" (default): a ppermute chain: in round r, device r scans its own slice from the state
  device r - 1 handed it, then hands its final state on. Only the owner computes in a round,
  so the critical path is the same D slice scans as one full scan, plus D hand-offs of the
  (small) state; no gathered activations. The rounds are rematerialised (the backward
  recomputes the owner's slice scan), so memory holds one round's residuals, not D.
  Measured on 8 H200s (docs/context_scaling.md): the chain took 20% less time a step at 128K
  tokens (16K per GPU) and less memory; at 32K-64K the two are within 6%. Hence the default.
- Gradients flow through all of it (all_gather's transpose is a reduce-scatter, ppermute's the
  reverse ppermute), so the same function serves training.

Batch dimensions may be split over other mesh axes at the same time (`batch_axes`), e.g. a
(data, context) mesh. Halo exchange for the causal convolutions and sliding-window attention of
the layers around the op is `previous_tokens` below.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tnt_jax.memory.rules import Gates, MemoryState
from tnt_jax.ops.api import memory_op
from tnt_jax.ops.tnt import TNTConfig, local_memory_op

Array = jax.Array


def use_gspmd_on_gpu() -> bool:
  """Work around an XLA crash: with jax 0.11.2 on GPU, compiling the backward of the
  context-parallel LM segfaults in the Shardy partitioner (forward, op-level gradients and every
  collective alone compile; GSPMD compiles and runs it all). Switches this process to GSPMD on a
  GPU backend and says whether it did (docs/context_parallel.md)."""
  if jax.default_backend() != "gpu" or not jax.config.jax_use_shardy_partitioner:
    return False
  jax.config.update("jax_use_shardy_partitioner", False)
  return True


def check_context_split(length: int, devices: int, config: TNTConfig) -> int:
  """The per-device slice length, or a ValueError naming the value and the rule."""
  if devices < 1:
    raise ValueError(f"context axis size={devices} must be >= 1")
  if length % devices:
    raise ValueError(f"sequence length T={length} does not split over {devices} context "
                     f"devices (T must be a multiple of the context axis size)")
  slice_len = length // devices
  for i, local in enumerate(config.local_memories):
    if slice_len % local.shard_length:
      raise ValueError(f"context slice T / devices = {length} / {devices} = {slice_len} is not "
                       f"a multiple of local {i}'s shard length S_L={local.shard_length}: every "
                       "local shard must lie on one device")
  return slice_len


def previous_tokens(x_BxLx_: Array, count: int, axis: str) -> Array:
  """The last `count` tokens of the previous device's slice along `axis` (zeros on device 0):
  the halo a causal convolution (count = width - 1) or a sliding window (count = window - 1)
  needs. Inside shard_map; count must not exceed the slice length."""
  if count > x_BxLx_.shape[1]:
    raise ValueError(f"halo of {count} tokens exceeds the per-device slice of "
                     f"{x_BxLx_.shape[1]}: use fewer context devices or a shorter window")
  devices = jax.lax.axis_size(axis)
  tail = x_BxLx_[:, x_BxLx_.shape[1] - count:]
  moved = jax.lax.ppermute(tail, axis, [(d, d + 1) for d in range(devices - 1)])
  first = jax.lax.axis_index(axis) == 0
  return jnp.where(first, jnp.zeros_like(moved), moved)


GLOBAL_HANDOFFS = ("gather", "chain")


def _global_by_gather(q, k, v, gates, state, slow, config, axis, implementation, remat,
                      kernel_blocks):
  gather = lambda x: None if x is None else jax.lax.all_gather(x, axis, axis=1, tiled=True)
  out, state = memory_op(gather(q), gather(k), gather(v), Gates(*map(gather, gates)), state,
                         slow, config, implementation=implementation, remat=remat,
                         kernel_blocks=kernel_blocks)
  slice_len = q.shape[1]
  mine = jax.lax.dynamic_slice_in_dim(out, jax.lax.axis_index(axis) * slice_len, slice_len,
                                      axis=1)
  return mine, state


def _global_by_chain(q, k, v, gates, state, slow, config, axis, implementation, remat,
                     kernel_blocks):
  devices, me = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
  scan_slice = lambda s: memory_op(q, k, v, gates, s, slow, config,
                                   implementation=implementation, remat=remat,
                                   kernel_blocks=kernel_blocks)
  out_shape, state_shape = jax.eval_shape(scan_slice, state)
  # the op carries its state in the accumulation dtype (float64 inputs with float32 W_init
  # give a float64 state): start in it, so the owner's and the idle branch's states agree
  state = jax.tree.map(lambda s, shape: s.astype(shape.dtype), state, state_shape)
  idle = lambda s: (jnp.zeros(out_shape.shape, out_shape.dtype), s)
  forward = [(d, d + 1) for d in range(devices - 1)]

  @jax.checkpoint
  def round_(carry, r):
    state_in, out = carry
    mine = me == r
    o, s = jax.lax.cond(mine, scan_slice, idle, state_in)
    handed = jax.lax.ppermute(s, axis, forward)
    state_next = jax.tree.map(lambda h, own: jnp.where(me == r + 1, h, own), handed, s)
    return (state_next, jnp.where(mine, o, out)), None

  (final, out), _ = jax.lax.scan(round_, (state, jnp.zeros(out_shape.shape, out_shape.dtype)),
                                 jnp.arange(devices))
  # The last device holds the sequence's final state; every device returns it.
  last = me == devices - 1
  final = jax.tree.map(lambda x: jax.lax.psum(jnp.where(last, x, jnp.zeros_like(x)), axis),
                       final)
  return out, final


def tnt_op_in_context(q_BxLxHxD: Array, k_BxLxHxD: Array, v_BxLxHxD: Array,
                      gates: Sequence[Gates], global_state: MemoryState,
                      local_initial_weights: Sequence[dict], slows: Sequence[dict],
                      config: TNTConfig, axis: str, *, implementation: str = "xla",
                      remat: bool = False, global_handoff: str = "chain", kernel_blocks=None
                      ) -> tuple[Array, MemoryState]:
  """Inside shard_map: this device's slice of tnt_op's outputs (see the module doc), and the
  global memory's final state (the same on every device of `axis`). kernel_blocks: as tnt_op's."""
  if global_handoff not in GLOBAL_HANDOFFS:
    raise ValueError(f"global_handoff={global_handoff!r} is unknown; expected one of "
                     f"{GLOBAL_HANDOFFS}")
  run_global = _global_by_gather if global_handoff == "gather" else _global_by_chain
  out, state = run_global(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, gates[0], global_state, slows[0],
                          config.global_memory, axis, implementation, remat, kernel_blocks)
  for i, local in enumerate(config.local_memories):
    out = out + local_memory_op(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, gates[i + 1],
                                local_initial_weights[i], slows[i + 1], local,
                                config.qk_projection, implementation, remat, kernel_blocks)
  return out, state


def _spec(batch_axes, *rest):
  return P(batch_axes, *rest)


def context_parallel_tnt_op(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array,
                            gates: Sequence[Gates], global_state: MemoryState,
                            local_initial_weights: Sequence[dict], slows: Sequence[dict],
                            config: TNTConfig, mesh: jax.sharding.Mesh, *, axis: str = "context",
                            batch_axes=None, implementation: str = "xla", remat: bool = False,
                            global_handoff: str = "chain", kernel_blocks=None
                            ) -> tuple[Array, MemoryState]:
  """tnt_op (ops/tnt.py) with the sequence split over mesh axis `axis`; same results."""
  if axis not in mesh.shape:
    raise ValueError(f"mesh axes {tuple(mesh.shape)} have no context axis {axis!r}")
  check_context_split(q_BxTxHxD.shape[1], mesh.shape[axis], config)
  seq = _spec(batch_axes, axis)
  gate_spec = lambda g: Gates(*(None if x is None else seq for x in g))
  replicated = lambda tree: jax.tree.map(lambda _: P(), tree)
  in_specs = (seq, seq, seq, tuple(gate_spec(g) for g in gates),
              jax.tree.map(lambda _: _spec(batch_axes), global_state),
              replicated(tuple(local_initial_weights)), replicated(tuple(slows)))
  out_specs = (seq, jax.tree.map(lambda _: _spec(batch_axes), global_state))

  def per_device(q, k, v, gates, state, inits, slows):
    return tnt_op_in_context(q, k, v, gates, state, inits, slows, config, axis,
                             implementation=implementation, remat=remat,
                             global_handoff=global_handoff, kernel_blocks=kernel_blocks)

  # check_vma=False: the memory scans start from replicated states (W_init, the global state) and
  # mix in per-device tokens, which the varying-axes type check rejects at the scan carry; the
  # global state that comes out is the same on every context device by construction (each
  # scans the same gathered sequence), so reading it from one device is exact.
  fn = jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                     check_vma=False)
  return fn(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, tuple(gates), global_state,
            tuple(local_initial_weights), tuple(slows))
