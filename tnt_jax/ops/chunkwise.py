"""The chunkwise-parallel memory op (SPEC §1.2-1.4) in plain XLA.

Inside a chunk every gradient is taken at the chunk-start state W0, so with the memory written
against `dense(layer, x)` (memory/models.py) each layer's per-token gradient is an outer product
delta_j a_j^T, and the state after token t is

    W_t = p_t W0 + q_t S0 + sum_{j<=t} c_tj delta_j a_j^T        (c: transitions.py, incl. -theta)

A cumulative read applies this to the query's activation x_t without forming W_t (the dual form):

    W_t x_t = p_t (W0 x_t) + q_t (S0 x_t) + sum_j c_tj (a_j . x_t) delta_j

i.e. C x C score matrices and C x d matmuls, never one weight copy per token. A `lax.scan` runs
over chunks carrying (W, S) in float32; gate coefficients for all chunks are computed before it.

Lengths that are not a multiple of C are padded at the end with tokens that carry no gradient and
leave the state unchanged (identity transitions); their outputs are dropped, so the final state is
the state after the last real token, exactly as in the token-level reference.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from tnt_jax.memory.config import MemoryConfig, accumulation_dtype
from tnt_jax.memory.losses import get_loss
from tnt_jax.memory.rules import Gates, MemoryState, lact_update
from tnt_jax.ops import transitions

Array = jax.Array


def _matmul(eq: str, x: Array, y: Array, compute_dtype, acc_dtype) -> Array:
  return jnp.einsum(eq, x.astype(compute_dtype), y.astype(compute_dtype),
                    preferred_element_type=acc_dtype)


def _to_chunks(x_BxTxHx_, num_chunks: int, chunk: int, fill=0.0) -> Array:
  """[B, T, H, ...] -> [N, B, H, C, ...], padding T at the end with `fill`."""
  b, t, h = x_BxTxHx_.shape[:3]
  pad = num_chunks * chunk - t
  if pad:
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (x_BxTxHx_.ndim - 2)
    x_BxTxHx_ = jnp.pad(x_BxTxHx_, widths, constant_values=fill)
  x = x_BxTxHx_.reshape((b, num_chunks, chunk, h) + x_BxTxHx_.shape[3:])
  return jnp.moveaxis(x, (1, 3), (0, 2))


def _from_chunks(x_NxBxHxCxD: Array, length: int) -> Array:
  n, b, h, c, d = x_NxBxHxCxD.shape
  return jnp.moveaxis(x_NxBxHxCxD, (0, 2), (1, 3)).reshape(b, n * c, h, d)[:, :length]


FULL_UNROLL_MAX_CHUNKS = 16
SMALL_CHUNK_UNROLL = 4


def checkpoint_group(num_chunks: int) -> int:
  """Chunks per checkpointed group: the divisor of num_chunks closest to sqrt(num_chunks)."""
  target = math.sqrt(num_chunks)
  divisors = [g for g in range(1, num_chunks + 1) if num_chunks % g == 0]
  return min(divisors, key=lambda g: (abs(g - target), g))


def scan_chunks(step, carry, xs, num_chunks: int, unroll: int):
  """lax.scan(step) over chunks, keeping the carried state (W, S) only at group starts.

  A plain scan saves every chunk's state [B, H, out, in] for the backward pass: one weight copy
  per chunk, ~6 GiB per layer for a batch of 16 x 2048 tokens at C = 8 (this, not the model,
  filled an H100). Groups of ~sqrt(N) chunks run as one checkpointed step, so the backward keeps
  N / G states and recomputes one group at a time (about one more forward of the scan). It also
  keeps the recomputation inside the backward loop, where XLA cannot hoist it next to the forward
  pass (it does that to block-level remat of a whole layer). Short scans (the global memory's few
  large chunks) stay plain and fully unrolled.
  """
  group = checkpoint_group(num_chunks)
  if num_chunks <= FULL_UNROLL_MAX_CHUNKS or group <= 1:
    return jax.lax.scan(step, carry, xs, unroll=unroll)
  xs_grouped = jax.tree.map(lambda x: x.reshape((num_chunks // group, group) + x.shape[1:]), xs)

  @jax.checkpoint
  def group_step(carry, xs_group):
    return jax.lax.scan(step, carry, xs_group, unroll=min(unroll, group))

  carry, ys = jax.lax.scan(group_step, carry, xs_grouped)
  return carry, jax.tree.map(lambda y: y.reshape((num_chunks,) + y.shape[2:]), ys)


def default_unroll(num_chunks: int) -> int:
  """Measured on an H100 (docs/op_benchmark.md): unrolling a short scan over a few large chunks
  fully is 2.5x faster at C=2048; over many small chunks, 4 steps per loop trip remove most of the
  loop overhead and more does not help."""
  return num_chunks if num_chunks <= FULL_UNROLL_MAX_CHUNKS else min(SMALL_CHUNK_UNROLL, num_chunks)


class _ChunkMath:
  """Batched per-chunk pieces shared by every rule: x [B, H, C, in], weights [B, H, out, in]."""

  def __init__(self, config: MemoryConfig, slow: dict, compute_dtype, acc_dtype):
    self.config = config
    self.loss = get_loss(config.loss)
    # Slow params [H, d] broadcast against activations [B, H, C, d].
    self.slow = jax.tree.map(lambda p: p[:, None, :].astype(acc_dtype), slow)
    self.cd, self.acc = compute_dtype, acc_dtype

  def mm(self, eq, x, y):
    return _matmul(eq, x, y, self.cd, self.acc)

  def dense_at(self, weights: dict):
    def dense(name, x):
      layer = weights[name]
      y = self.mm("bhci,bhoi->bhco", x, layer["w"])
      return y + layer["b"][:, :, None, :] if "b" in layer else y
    return dense

  def apply(self, dense, x):
    return self.config.model.apply(dense, self.slow, x)

  def token_gradients(self, weights: dict, k_BxHxCxD: Array, v_BxHxCxD: Array):
    """Per-token loss gradients at `weights` as outer products: ({layer: delta}, {layer: a})."""
    plain = self.dense_at(weights)
    perturb = {name: jnp.zeros(k_BxHxCxD.shape[:3] + (layer["w"].shape[-2],), self.acc)
               for name, layer in weights.items()}

    def total_loss(perturb):
      inputs = {}

      def dense(name, x):
        inputs[name] = x
        return plain(name, x) + perturb[name]

      y = self.apply(dense, k_BxHxCxD.astype(self.acc))
      return jnp.sum(self.loss(y, v_BxHxCxD.astype(self.acc))), inputs

    return jax.grad(total_loss, has_aux=True)(perturb)

  def outer_sum(self, coef_BxHxC, deltas, inputs, like: dict) -> dict:
    """sum_j coef_j delta_j a_j^T for each layer (bias: sum_j coef_j delta_j)."""
    out = {}
    for name, layer in like.items():
      scaled = deltas[name] * coef_BxHxC[..., None]
      out[name] = {"w": self.mm("bhco,bhci->bhoi", scaled, inputs[name])}
      if "b" in layer:
        out[name]["b"] = jnp.sum(scaled, axis=2)
    return out


def _combine(coef_w, w: dict, update: dict, coef_s=None, s=None) -> dict:
  """coef_w * W [+ coef_s * S] + update, with [B, H] coefficients broadcast over each leaf."""
  bc = lambda c, x: c.reshape(c.shape + (1,) * (x.ndim - c.ndim))
  if s is None:
    return jax.tree.map(lambda w_, u: bc(coef_w, w_) * w_ + u, w, update)
  return jax.tree.map(lambda w_, s_, u: bc(coef_w, w_) * w_ + bc(coef_s, s_) * s_ + u,
                      w, s, update)


class ChunkScan(NamedTuple):
  """What a scan over chunks needs: `step(carry, xs_n) -> (carry, out_n)`, the initial carry
  (W, S) in the accumulation dtype, and xs with a leading chunk axis [N, ...]."""
  step: Callable
  carry: tuple
  xs: tuple
  num_chunks: int


def chunk_scan(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, gates: Gates,
               state: MemoryState, slow: dict, config: MemoryConfig) -> ChunkScan:
  """The chunk step and its inputs (shared by this op and ops/affine.py, which runs the same
  step for every chunk at once from start states it composes in parallel)."""
  b, t, h, d = q_BxTxHxD.shape
  chunk, rule = config.chunk_size, config.rule
  num_chunks = -(-t // chunk)
  cd = q_BxTxHxD.dtype
  acc = accumulation_dtype(cd, state)
  math = _ChunkMath(config, slow, cd, acc)

  q_c, k_c, v_c = (_to_chunks(x, num_chunks, chunk) for x in (q_BxTxHxD, k_BxTxHxD, v_BxTxHxD))
  valid_NxC = (jnp.arange(num_chunks * chunk) < t).reshape(num_chunks, chunk)
  valid = valid_NxC[:, None, None, :]                                    # [N, 1, 1, C]
  gate = lambda g: None if g is None else _to_chunks(g.astype(acc), num_chunks, chunk)
  theta, eta, alpha = gate(gates.theta), gate(gates.eta), gate(gates.alpha)
  theta = jnp.where(valid, theta, 0.0)                                   # [N, B, H, C]
  weights0 = jax.tree.map(lambda x: x.astype(acc), state.weights)
  momentum0 = None if state.momentum is None else jax.tree.map(lambda x: x.astype(acc),
                                                               state.momentum)

  if rule.kind == "lact":
    beta = None
    if rule.has_momentum:
      eta = jnp.where(valid, eta, 0.0)
      beta = jnp.sum(eta, -1) / jnp.maximum(jnp.sum(valid, -1), 1)       # [N, B, H]

    def step(carry, xs):
      w0, m0 = carry
      q, k, v, theta_c, beta_c = xs
      deltas, inputs = math.token_gradients(w0, k, v)
      out = math.apply(math.dense_at(w0), q.astype(acc))
      grad = math.outer_sum(theta_c, deltas, inputs, w0)
      return lact_update(w0, m0, grad, beta_c, rule), out

    xs = (q_c, k_c, v_c, theta, beta)
  else:
    coefs = transitions.gate_coefficients(theta, eta, alpha, valid, config.read)
    has_s = rule.has_momentum

    def step(carry, xs):
      w0, s0 = carry
      q, k, v, c = xs
      deltas, inputs = math.token_gradients(w0, k, v)
      q = q.astype(acc)
      if config.read == "cumulative":
        out = math.apply(_dual_dense(math, w0, s0, deltas, inputs, c), q)
      else:
        out = math.apply(math.dense_at(w0), q)
      end = chunk_end(c, config.read)
      w1 = _combine(end.w_from_w0, w0, math.outer_sum(end.w_from_x, deltas, inputs, w0),
                    end.w_from_s0, s0 if has_s else None)
      s1 = None
      if has_s:
        s1 = _combine(c.s_from_s0, s0, math.outer_sum(c.s_from_x, deltas, inputs, w0))
      return (w1, s1), out

    xs = (q_c, k_c, v_c, coefs)
  return ChunkScan(step, (weights0, momentum0), xs, num_chunks)


def chunk_end(c: transitions.ChunkCoefficients, read: str) -> transitions.ChunkCoefficients:
  """The coefficients of the chunk-end state (the cumulative read's last token)."""
  if read != "cumulative":
    return c
  return c._replace(w_from_w0=c.w_from_w0[..., -1], w_from_s0=c.w_from_s0[..., -1],
                    w_from_x=c.w_from_x[..., -1, :])


def chunkwise_memory(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, gates: Gates,
                     state: MemoryState, slow: dict, config: MemoryConfig, *,
                     remat: bool = False, unroll: int | None = None):
  """Chunkwise-parallel memory. Same contract as `reference_memory` (see ops/api.py)."""
  step, carry0, xs, num_chunks = chunk_scan(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates, state, slow,
                                            config)
  if remat:
    step = jax.checkpoint(step)
  unroll = default_unroll(num_chunks) if unroll is None else min(unroll, num_chunks)
  (w_final, s_final), out_N = scan_chunks(step, carry0, xs, num_chunks, unroll)
  out = _from_chunks(out_N, q_BxTxHxD.shape[1]).astype(q_BxTxHxD.dtype)
  return out, MemoryState(w_final, s_final)


def _dual_dense(math: _ChunkMath, w0: dict, s0, deltas: dict, inputs: dict,
                c: transitions.ChunkCoefficients):
  """dense() that applies W_t (the state after token t) to each row x_t, in dual form."""
  at_w0 = math.dense_at(w0)
  at_s0 = math.dense_at(s0) if s0 is not None else None

  def dense(name, x_BxHxCxI):
    y = c.w_from_w0[..., None] * at_w0(name, x_BxHxCxI)
    if at_s0 is not None:
      y = y + c.w_from_s0[..., None] * at_s0(name, x_BxHxCxI)
    scores = math.mm("bhti,bhji->bhtj", x_BxHxCxI, inputs[name])
    if "b" in w0[name]:
      scores = scores + 1.0
    return y + math.mm("bhtj,bhjo->bhto", c.w_from_x * scores, deltas[name])

  return dense
