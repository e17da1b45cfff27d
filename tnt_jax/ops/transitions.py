"""Coefficients of the Titans/TTT recurrence inside a chunk, exactly and without logarithms.

Per valid token t the pair (W, S) evolves linearly, with input x_t = -theta_t u_t:
    [W_t]   [1-alpha_t  eta_t] [W_{t-1}]   [x_t]
    [S_t] = [    0      eta_t] [S_{t-1}] + [x_t]
(gd: alpha = eta = 0, no S carried). A padded token is the identity with no input. Products of
these upper-triangular 2x2 matrices are again upper triangular, stored as (p, q, r) =
[[p, q], [0, r]]; we form them with associative scans, so gates equal to 0 or 1 are exact and
nothing is divided.

Cumulative read needs, for every pair t >= j in a chunk, P[t, j] = M_t ... M_{j+1}:
    W_t = p[t,-1] W_0 + q[t,-1] S_0 + sum_j (p + q)[t, j] x_j
    S_t =                r[t,-1] S_0 + sum_j       r[t, j] x_j
Chunk-start read only needs the chunk's end (t = C-1): suffix products, O(C) per chunk.

Small chunks (C <= SEQUENTIAL_MAX_CHUNK, where the kernels live) compose the products token by
token in an unrolled loop instead: on an H100 XLA fused the associative scan's backward (strided
slices and interior pads over [.., C, C+1]) into one kernel that re-derived every level per
element, 0.84 ms per layer at 384 rows x 64 chunks of 8 (the largest XLA kernel of the small
TNT LM's step); the loop's C - 1 compositions are plain elementwise chains.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
SEQUENTIAL_MAX_CHUNK = 32


class ChunkCoefficients(NamedTuple):
  """All arrays carry leading dims [..., C] (per token) or [..., C, C] (token t, source j)."""
  w_from_w0: Array        # [..., C]     p[t, -1]       (or [...] at the chunk end)
  w_from_s0: Array        # [..., C]     q[t, -1]
  w_from_x: Array         # [..., C, C]  (p+q)[t, j] * theta_j, zero for j > t  ([..., C] at end)
  s_from_s0: Array        # [...]        r[C-1, -1]
  s_from_x: Array         # [..., C]     r[C-1, j] * theta_j


def _compose(earlier, later):
  """later @ earlier for upper-triangular 2x2 matrices (p, q, r)."""
  p1, q1, r1 = earlier
  p2, q2, r2 = later
  return p2 * p1, p2 * q1 + q2 * r1, r2 * r1


def _cumulative_compose(p, q, r, axis: int, reverse: bool = False):
  """Inclusive running products of (p, q, r) along `axis` (later @ earlier; from the end with
  reverse): an unrolled loop for short axes, an associative scan otherwise."""
  size = p.shape[axis]
  if size > SEQUENTIAL_MAX_CHUNK:
    combine = (lambda later, earlier: _compose(earlier, later)) if reverse else _compose
    return jax.lax.associative_scan(combine, (p, q, r), reverse=reverse, axis=axis)
  at = lambda x, i: jax.lax.index_in_dim(x, i, axis, keepdims=False)
  order = range(size - 1, -1, -1) if reverse else range(size)
  running, out = None, [None] * size
  for i in order:
    token = (at(p, i), at(q, i), at(r, i))
    if running is None:
      running = token
    else:   # the new token is the later factor walking forward, the earlier one walking back
      running = _compose(token, running) if reverse else _compose(running, token)
    out[i] = running
  return tuple(jnp.stack([o[k] for o in out], axis=axis) for k in range(3))


def _token_matrices(alpha_xC, eta_xC, valid_xC):
  one = jnp.ones_like(alpha_xC)
  p = jnp.where(valid_xC, 1.0 - alpha_xC, one)
  q = jnp.where(valid_xC, eta_xC, 0.0 * one)
  r = jnp.where(valid_xC, eta_xC, one)
  return p, q, r


def chunk_end_coefficients(theta_xC, eta_xC, alpha_xC, valid_xC) -> ChunkCoefficients:
  """Coefficients of the state at the chunk's last token (chunk-start read needs only these).

  theta/eta/alpha: [..., C] (theta already zero at padded tokens); valid: [..., C] bool.
  """
  p, q, r = _token_matrices(alpha_xC, eta_xC, valid_xC)
  # suffix[i] = M_{C-1} ... M_i ; suffix[C] = I.  The state's coefficient of x_j is suffix[j+1].
  suf_p, suf_q, suf_r = _cumulative_compose(p, q, r, axis=p.ndim - 1, reverse=True)
  one = jnp.ones_like(p[..., :1])
  zero = jnp.zeros_like(one)
  next_p = jnp.concatenate([suf_p[..., 1:], one], axis=-1)
  next_q = jnp.concatenate([suf_q[..., 1:], zero], axis=-1)
  next_r = jnp.concatenate([suf_r[..., 1:], one], axis=-1)
  return ChunkCoefficients(
      w_from_w0=suf_p[..., 0], w_from_s0=suf_q[..., 0],
      w_from_x=(next_p + next_q) * theta_xC,
      s_from_s0=suf_r[..., 0], s_from_x=next_r * theta_xC)


def chunk_token_coefficients(theta_xC, eta_xC, alpha_xC, valid_xC) -> ChunkCoefficients:
  """Per-token coefficients for the cumulative read, plus the chunk-end ones."""
  size = theta_xC.shape[-1]
  p, q, r = _token_matrices(alpha_xC, eta_xC, valid_xC)
  # Column j' = j + 1 in [0, C] holds sources j = -1 (initial state) .. C-1; row t holds M_t
  # where t > j, else the identity, so a cumulative product down the rows gives P[t, j].
  t_idx = jnp.arange(size)[:, None]
  j_idx = jnp.arange(size + 1)[None, :] - 1
  after_source = t_idx > j_idx                                   # [C, C+1]
  expand = lambda x, fill: jnp.where(after_source, x[..., :, None], fill)
  one = jnp.ones_like(p)[..., :, None]
  pm, qm, rm = expand(p, one), expand(q, 0.0 * one), expand(r, one)
  cp, cq, cr = _cumulative_compose(pm, qm, rm, axis=pm.ndim - 2)
  causal = (t_idx >= j_idx)[:, 1:]                               # [C, C]: t >= j
  w_from_x = jnp.where(causal, (cp + cq)[..., 1:], 0.0) * theta_xC[..., None, :]
  return ChunkCoefficients(
      w_from_w0=cp[..., 0], w_from_s0=cq[..., 0], w_from_x=w_from_x,
      s_from_s0=cr[..., -1, 0], s_from_x=cr[..., -1, 1:] * theta_xC)


def gate_coefficients(theta_xC, eta_xC, alpha_xC, valid_xC, read: str) -> ChunkCoefficients:
  """The coefficients a read mode needs, from the raw gates of every chunk ([..., C] each).

  eta / alpha may be None (gd: no momentum, no forgetting); theta is zeroed at padded tokens;
  valid broadcasts against theta. Per-token coefficients for "cumulative", chunk-end ones for
  "chunk_start". Shared by the XLA chunkwise op and the Pallas kernel.
  """
  valid_xC = jnp.broadcast_to(valid_xC, theta_xC.shape)
  theta_xC = jnp.where(valid_xC, theta_xC, 0.0)
  zeros = jnp.zeros_like(theta_xC)
  eta_xC = zeros if eta_xC is None else eta_xC
  alpha_xC = zeros if alpha_xC is None else alpha_xC
  coef_fn = chunk_token_coefficients if read == "cumulative" else chunk_end_coefficients
  return coef_fn(-theta_xC, eta_xC, alpha_xC, valid_xC)
