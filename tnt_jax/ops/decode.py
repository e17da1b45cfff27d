"""Recurrent decoding of the TNT op (SPEC §2.2): a prefill in parallel form, then O(1) per token.

    out, state = tnt_prefill(q, k, v, gates, global_state, local_initial_weights, slows, config)
    o_t, state = tnt_decode_step(q_t, k_t, v_t, gates_t, state, local_initial_weights, slows,
                                 config)

`TNTDecodeState` holds every memory's token-level carry (memory/reference.py `TokenRule`): fast
weights, momentum, the chunk-start weights the chunk's gradients are taken at (LaCT: the chunk's
accumulated gradient), and each local's Q-K matrix, batched [B, H, ...], plus the stream position.
A decode step applies the reference rule once per memory: the global memory updates its weights
token by token and reads them at chunk start, locals reset every S_L. Work and memory per token
do not depend on the position.

Prefill of T tokens: each memory runs the chunkwise op over its chunk-aligned prefix, then the
reference rule over the < C remaining tokens of its unfinished chunk (for the carry; its outputs
are the parallel ones). A prefill must start where every chunk and shard of the model begins
(position 0, or any multiple of `alignment(config)`), because the parallel op counts chunks from
its first token; decode steps may be taken anywhere.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from tnt_jax.memory.config import MemoryConfig, accumulation_dtype
from tnt_jax.memory.reference import TokenRule
from tnt_jax.memory.rules import Gates, MemoryState
from tnt_jax.ops.api import memory_op
from tnt_jax.ops.tnt import LocalMemory, TNTConfig, local_memory_op

Array = jax.Array


class TNTDecodeState(NamedTuple):
  global_carry: dict          # TokenRule carry, leaves [B, H, ...]
  local_carries: tuple        # one TokenRule carry per local memory
  position: Array             # int32 []: the stream position of the next token


def alignment(config: TNTConfig) -> int:
  """Positions where a parallel (multi-token) call may start: multiples of every chunk and
  shard length of the op."""
  sizes = [config.global_memory.chunk_size]
  for local in config.local_memories:
    sizes += [local.memory.chunk_size, local.shard_length]
  return math.lcm(*sizes)


def _zeros_if_none(g, like):
  return jnp.zeros_like(like) if g is None else g


def _batched_steps(config: MemoryConfig, carry: dict, t, q_BxHxD, k_BxHxD, v_BxHxD,
                   gates_BxH: Gates, slow: dict, local: LocalMemory | None = None,
                   reset_weights: dict | None = None, qk_projection: bool = False):
  """TokenRule.step for every (batch, head): leaves of carry [B, H, ...], slow [H, ...]."""
  theta = gates_BxH.theta
  eta, alpha = _zeros_if_none(gates_BxH.eta, theta), _zeros_if_none(gates_BxH.alpha, theta)

  def one_head(carry, q, k, v, th, et, al, slow_h, reset_h):
    reset = None
    if local is not None:
      momentum = jax.tree.map(jnp.zeros_like, reset_h) if config.rule.has_momentum else None
      reset = MemoryState(reset_h, momentum)
    rule = TokenRule(config, slow_h, reset_state=reset,
                     shard_length=None if local is None else local.shard_length,
                     qk_projection=qk_projection)
    return rule.step(carry, t, q, k, v, th, et, al)

  heads = jax.vmap(one_head, in_axes=(0,) * 9)
  batch = jax.vmap(heads, in_axes=(0,) * 7 + (None, None))
  reset = {} if reset_weights is None else reset_weights
  return batch(carry, q_BxHxD, k_BxHxD, v_BxHxD, theta, eta, alpha, slow, reset)


def initial_carry(config: MemoryConfig, state: MemoryState, dtype=None) -> dict:
  """The carry at a chunk boundary from a MemoryState with leaves [B, H, ...], in `dtype` (the
  state's own by default)."""
  if dtype is not None:
    state = jax.tree.map(lambda x: x.astype(dtype), state)
  leaf = jax.tree.leaves(state.weights)[0]
  head_dim = leaf.shape[-1]
  rule = TokenRule(config, {})
  make = lambda w, m: rule.initial_carry(w, m, head_dim, leaf.dtype)
  return jax.vmap(jax.vmap(make))(state.weights, state.momentum)


def carry_state(carry: dict) -> MemoryState:
  """The MemoryState a parallel call continues from; exact only at a chunk boundary."""
  return MemoryState(carry["w"], carry["m"])


def _scan_steps(config, carry, t0, q, k, v, gates: Gates, slow, **local_options):
  """Token steps over [B, T, H, ...] inputs from stream position t0; returns (carry, o)."""
  move = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)

  def step(carry, inputs):
    i, q_t, k_t, v_t, gates_t = inputs
    return _batched_steps(config, carry, t0 + i, q_t, k_t, v_t, gates_t, slow, **local_options)

  gates_T = Gates(*(move(g) for g in gates))
  carry, o_TxBxHxD = jax.lax.scan(step, carry, (jnp.arange(q.shape[1]), move(q), move(k),
                                                move(v), gates_T))
  return carry, jnp.moveaxis(o_TxBxHxD, 0, 1)


def _slice(x, lo, hi):
  return None if x is None else x[:, lo:hi]


def _cast_all(dtype, *trees):
  return [jax.tree.map(lambda x: x.astype(dtype), t) for t in trees]


def _global_prefill(q, k, v, gates: Gates, state: MemoryState, slow, memory: MemoryConfig,
                    implementation, remat, kernel_blocks):
  """Outputs of the global memory and its carry after T tokens."""
  t = q.shape[1]
  aligned = t // memory.chunk_size * memory.chunk_size
  outs = []
  if aligned:
    out, state = memory_op(q[:, :aligned], k[:, :aligned], v[:, :aligned],
                           Gates(*(_slice(g, 0, aligned) for g in gates)), state, slow, memory,
                           implementation=implementation, remat=remat,
                           kernel_blocks=kernel_blocks)
    outs.append(out)
  acc = accumulation_dtype(q.dtype, state)
  carry = initial_carry(memory, state, acc)
  if aligned < t:
    rest = _cast_all(acc, q[:, aligned:], k[:, aligned:], v[:, aligned:],
                     Gates(*(_slice(g, aligned, t) for g in gates)), slow)
    carry, out = _scan_steps(memory, carry, aligned, *rest)
    outs.append(out.astype(q.dtype))
  return jnp.concatenate(outs, axis=1), carry


def _local_carry(q, k, v, gates: Gates, initial_weights, slow, local: LocalMemory,
                 qk_projection: bool, implementation, kernel_blocks=None):
  """A local memory's carry after T tokens: its last (unfinished) shard, replayed."""
  b, t = q.shape[:2]
  s, c = local.shard_length, local.memory.chunk_size
  state = local.memory.init_state(initial_weights, b)
  acc = accumulation_dtype(q.dtype, state)
  start = t // s * s
  carry = initial_carry(local.memory, state, acc)
  if start == t:            # the next token starts a shard and resets: the fresh carry serves
    return carry
  aligned = start + (t - start) // c * c
  if aligned > start:
    part = lambda x: _slice(x, start, aligned)
    _, state = memory_op(part(q), part(k), part(v), Gates(*(part(g) for g in gates)), state,
                         slow, local.memory, implementation=implementation,
                         kernel_blocks=kernel_blocks)
    carry = initial_carry(local.memory, state, acc)
    if qk_projection:
      kk = k[:, start:aligned].astype(carry["proj"].dtype)
      k_hat = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
      carry["proj"] = jnp.einsum("bthd,bthe->bhde", k_hat, k_hat)
  rest = _cast_all(acc, q[:, aligned:], k[:, aligned:], v[:, aligned:],
                   Gates(*(_slice(g, aligned, t) for g in gates)), slow)
  reset = jax.tree.map(lambda w: w.astype(acc), initial_weights)
  carry, _ = _scan_steps(local.memory, carry, aligned, *rest, local=local, reset_weights=reset,
                         qk_projection=qk_projection)
  return carry


def tnt_prefill(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, gates: Sequence[Gates],
                global_state: MemoryState, local_initial_weights: Sequence[dict],
                slows: Sequence[dict], config: TNTConfig, *, position=0,
                implementation: str = "xla", remat: bool = False, kernel_blocks=None
                ) -> tuple[Array, TNTDecodeState]:
  """tnt_op's outputs for T tokens starting at an aligned `position`, and the decode state
  after them. global_state: the global memory's state at `position` (carry_state of a decode
  state, or init_state at the stream start). kernel_blocks: as tnt_op's."""
  out, g_carry = _global_prefill(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates[0], global_state,
                                 slows[0], config.global_memory, implementation, remat,
                                 kernel_blocks)
  local_carries = []
  for i, local in enumerate(config.local_memories):
    args = (q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates[i + 1], local_initial_weights[i],
            slows[i + 1], local, config.qk_projection)
    out = out + local_memory_op(*args, implementation=implementation, remat=remat,
                                kernel_blocks=kernel_blocks)
    local_carries.append(_local_carry(*args, implementation=implementation,
                                      kernel_blocks=kernel_blocks))
  t = q_BxTxHxD.shape[1]
  return out, TNTDecodeState(g_carry, tuple(local_carries),
                             jnp.asarray(position, jnp.int32) + t)


def init_decode_state(global_state: MemoryState, local_initial_weights: Sequence[dict],
                      config: TNTConfig, compute_dtype=jnp.float32) -> TNTDecodeState:
  """The decode state at position 0 (nothing read yet), carried in the accumulation dtype of
  `compute_dtype` (float32, or float64 for float64 inputs)."""
  batch = jax.tree.leaves(global_state.weights)[0].shape[0]
  acc = accumulation_dtype(compute_dtype, global_state)
  locals_ = tuple(initial_carry(l.memory, l.memory.init_state(w, batch), acc)
                  for l, w in zip(config.local_memories, local_initial_weights))
  return TNTDecodeState(initial_carry(config.global_memory, global_state, acc), locals_,
                        jnp.zeros((), jnp.int32))


def tnt_decode_step(q_BxHxD: Array, k_BxHxD: Array, v_BxHxD: Array, gates: Sequence[Gates],
                    state: TNTDecodeState, local_initial_weights: Sequence[dict],
                    slows: Sequence[dict], config: TNTConfig) -> tuple[Array, TNTDecodeState]:
  """One token at state.position: gates leaves [B, H]; returns (o [B, H, D], next state)."""
  acc = accumulation_dtype(q_BxHxD.dtype, MemoryState(state.global_carry["w"]))
  q, k, v = _cast_all(acc, q_BxHxD, k_BxHxD, v_BxHxD)
  t = state.position
  g_carry, out = _batched_steps(config.global_memory, state.global_carry, t, q, k, v,
                                *_cast_all(acc, gates[0], slows[0]))
  carries = []
  for i, local in enumerate(config.local_memories):
    gates_i, slow_i, reset = _cast_all(acc, gates[i + 1], slows[i + 1], local_initial_weights[i])
    carry, o = _batched_steps(local.memory, state.local_carries[i], t, q, k, v, gates_i, slow_i,
                              local=local, reset_weights=reset,
                              qk_projection=config.qk_projection)
    out = out + o
    carries.append(carry)
  # Keep the carry's dtypes, so a decode loop never changes its state's types.
  like = lambda new, old: jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)
  return out.astype(q_BxHxD.dtype), TNTDecodeState(
      like(g_carry, state.global_carry), like(tuple(carries), state.local_carries), t + 1)
