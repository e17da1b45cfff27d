"""The TNT hierarchical memory op (SPEC §2): one global memory plus N local memories.

Global: any memory (TNT uses a large chunk C_G read at chunk start), carried across the sequence.
Local i: chunk C_L, shard length S_L (a multiple of C_L); its state resets to the learned W_init
at every shard start, so shards are independent and run as one batch: the sequence is cut into
shards that are folded into the batch axis (a vmap over shards; `jax.shard_map` can later place
them on devices). Optional Q-K projection: local reads use P_t q_t, P_t = sum_{tau in shard,
tau <= t} k k^T / ||k||^2. Output = global + sum of locals. With no locals this is Titans.

A call is assumed to start at a shard boundary (position 0 of the stream for the global memory's
chunk grid too). Lengths need not be multiples of C_G, C_L or S_L: the last chunk / shard is
shorter.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from tnt_jax.memory.config import MemoryConfig
from tnt_jax.memory.reference import reference_memory
from tnt_jax.memory.rules import Gates, MemoryState
from tnt_jax.ops.api import IMPLEMENTATIONS, memory_op, validate_memory_inputs

Array = jax.Array
PROJECTION_BLOCK = 64   # tokens per block of the chunkwise Q-K projection


@dataclasses.dataclass(frozen=True)
class LocalMemory:
  memory: MemoryConfig
  shard_length: int

  def __post_init__(self):
    if (not isinstance(self.shard_length, int) or self.shard_length < 1
        or self.shard_length % self.memory.chunk_size):
      raise ValueError(f"shard_length={self.shard_length!r} must be a positive multiple of the "
                       f"local chunk_size={self.memory.chunk_size}")


@dataclasses.dataclass(frozen=True)
class TNTConfig:
  global_memory: MemoryConfig
  local_memories: tuple[LocalMemory, ...] = ()
  qk_projection: bool = True

  def __post_init__(self):
    object.__setattr__(self, "local_memories", tuple(self.local_memories))
    for i, local in enumerate(self.local_memories):
      if not isinstance(local, LocalMemory):
        raise ValueError(f"local_memories[{i}] must be a LocalMemory, got {type(local).__name__}")


def _projection_block(shard_length: int) -> int:
  """The largest divisor of the shard length that is at most PROJECTION_BLOCK."""
  return max(b for b in range(1, min(PROJECTION_BLOCK, shard_length) + 1)
             if shard_length % b == 0)


def qk_project(q_BxTxHxD: Array, k_BxTxHxD: Array, shard_length: int) -> Array:
  """P_t q_t with P_t the running sum of k k^T/||k||^2 since t's shard start (chunkwise).

  Inside a block of c tokens: a causal (q . k_hat) k_hat product; across blocks: q P_prev with
  P_prev the exclusive cumulative sum of the blocks' k_hat^T k_hat (a d x d matrix per block).
  """
  b, t, h, d = q_BxTxHxD.shape
  shards = -(-t // shard_length)
  pad = shards * shard_length - t
  c = _projection_block(shard_length)
  acc = jnp.promote_types(q_BxTxHxD.dtype, jnp.float32)

  def blocks(x, fill):
    x = jnp.pad(x.astype(acc), [(0, 0), (0, pad), (0, 0), (0, 0)], constant_values=fill)
    return x.reshape(b, shards, shard_length // c, c, h, d)

  q = blocks(q_BxTxHxD, 0.0)
  k = blocks(k_BxTxHxD, 1.0)   # padding keys are non-zero so no 0/0 appears, even unused
  k_hat = k / jnp.sqrt(jnp.sum(k * k, axis=-1, keepdims=True))
  causal = jnp.tril(jnp.ones((c, c), bool))
  scores = jnp.where(causal, jnp.einsum("bsnthd,bsnjhd->bsnhtj", q, k_hat), 0.0)
  intra = jnp.einsum("bsnhtj,bsnjhd->bsnthd", scores, k_hat)
  per_block = jnp.einsum("bsnjhd,bsnjhe->bsnhde", k_hat, k_hat)
  before = jnp.cumsum(per_block, axis=2) - per_block                 # exclusive, within a shard
  inter = jnp.einsum("bsnthd,bsnhde->bsnthe", q, before)
  out = (intra + inter).reshape(b, shards * shard_length, h, d)[:, :t]
  return out.astype(q_BxTxHxD.dtype)


def _fold_shards(x, shard_length, fill=0.0):
  """[B, T, ...] -> [B * shards, S_L, ...], padding T at the end."""
  b, t = x.shape[:2]
  shards = -(-t // shard_length)
  pad = shards * shard_length - t
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  return x.reshape((b * shards, shard_length) + x.shape[2:])


def local_memory_op(q, k, v, gates: Gates, initial_weights: dict, slow: dict, local: LocalMemory,
                    qk_projection: bool, implementation: str = "xla", remat: bool = False,
                    kernel_blocks=None):
  """One local memory over a whole sequence: shards in parallel, each from W_init."""
  b, t = q.shape[:2]
  s = local.shard_length
  if implementation == "reference":
    state = local.memory.init_state(initial_weights, b)
    return reference_memory(q, k, v, gates, state, slow, local.memory, shard_length=s,
                            qk_projection=qk_projection)[0]
  if qk_projection:
    q = qk_project(q, k, s)
  fold = lambda x, fill=0.0: None if x is None else _fold_shards(x, s, fill)
  q_s, k_s, v_s = fold(q), fold(k, 1.0), fold(v)
  gates_s = Gates(*(fold(g) for g in gates))
  state = local.memory.init_state(initial_weights, q_s.shape[0])
  out, _ = memory_op(q_s, k_s, v_s, gates_s, state, slow, local.memory,
                     implementation=implementation, remat=remat, kernel_blocks=kernel_blocks)
  return out.reshape((b, -1) + out.shape[2:])[:, :t]


def tnt_op(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, gates: Sequence[Gates],
           global_state: MemoryState, local_initial_weights: Sequence[dict],
           slows: Sequence[dict], config: TNTConfig, *, implementation: str = "xla",
           remat: bool = False, kernel_blocks=None) -> tuple[Array, MemoryState]:
  """o = o_global + sum_i o_local_i. Returns (outputs [B,T,H,D], the global memory's state).

  gates / slows: one entry per memory, the global memory first, then the locals in order.
  local_initial_weights: the learned W_init of each local memory, leaves [H, ...].
  remat: recompute each memory chunk in the backward pass (see memory_op).
  kernel_blocks: the Pallas kernel's KernelBlocks for every memory (see memory_op).
  """
  n = 1 + len(config.local_memories)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is unknown; expected one of "
                     f"{IMPLEMENTATIONS}")
  if len(gates) != n or len(slows) != n or len(local_initial_weights) != n - 1:
    raise ValueError(f"TNT with {n - 1} local memories needs {n} gates (got {len(gates)}), "
                     f"{n} slow param dicts (got {len(slows)}) and {n - 1} local initial "
                     f"weights (got {len(local_initial_weights)})")
  batch = q_BxTxHxD.shape[0]
  for i, local in enumerate(config.local_memories):
    # Validate each local against the whole sequence before anything is traced.
    validate_memory_inputs(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates[i + 1],
                           local.memory.init_state(local_initial_weights[i], batch),
                           slows[i + 1], local.memory)
  out, global_state = memory_op(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates[0], global_state,
                                slows[0], config.global_memory, implementation=implementation,
                                remat=remat, kernel_blocks=kernel_blocks)
  for i, local in enumerate(config.local_memories):
    out = out + local_memory_op(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates[i + 1],
                                local_initial_weights[i], slows[i + 1], local,
                                config.qk_projection, implementation, remat, kernel_blocks)
  return out, global_state
