"""The linear memory's chunks composed in parallel: an associative scan of affine maps.

For a linear memory (f = W x [+ b]) under the l2 or dot loss, every gradient in a chunk is taken
at the chunk-start state, and is affine in it: with x~ = [x; 1] when there is a bias and
W~ = [W | b], the l2 gradient of token j is 2 (W~0 k~_j - v_j) k~_j^T. So one chunk maps the
state X = [W~ | S~] (S: momentum, titans only) to

    X_end = X_0 A + B,   A = [[p I + lam G_x, lam G_s],     G_c = K~^T diag(c) K~
                               [q I,           r I    ]],   B = -mu [V^T diag(x) K~, V^T diag(s) K~]

with the chunk-end coefficients p, q, r, x, s of ops/transitions.py (lam = mu = 2 for l2;
lam = 0, mu = 1 for dot; gd keeps only the W~ block). Maps compose as
(A1, B1) then (A2, B2) = (A1 A2, B1 A2 + B2), which is associative. In blocks of L ~ sqrt(N)
chunks, all blocks at once:
  1. each block's map: an L-step scan applying each chunk's map to the rows of an identity
     (a rank-C update per chunk: O(m d C) with m = d~ or 2 d~, never an m^3 product);
  2. the blocks' maps composed by `lax.associative_scan` (dense, log depth over N / L blocks),
     which gives every block's start state;
  3. every chunk's start state: a second L-step scan inside every block.
So the sequential depth is ~2 sqrt(N) steps instead of the chunkwise op's N. The chunks' outputs
then come from the chunkwise op's own chunk step, run for all chunks at once (vmap) from those
start states: the read math is shared, not re-derived. Autodiff gives the backward.

The maps multiply in the accumulation dtype (`map_precision`: float32 arithmetic by default, so
no TF32 or bf16 rounding compounds through the composition). Memory: every chunk's start state
and each step of pass 1 are kept for the backward, more than the chunkwise op's sqrt(N)
checkpoints (H100 numbers: docs/affine_scan.md).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tnt_jax.memory.config import MemoryConfig
from tnt_jax.memory.rules import Gates, MemoryState
from tnt_jax.ops import chunkwise

Array = jax.Array
# Per loss: (lam, mu) in  d loss / d y = lam * W~ k~ - mu * v.
_LOSS_TERMS = {"l2": (2.0, 2.0), "dot": (0.0, 1.0)}


def unsupported_reason(config: MemoryConfig) -> str | None:
  """Why this op cannot run `config` (None: it can); the state map must be affine."""
  model = config.model
  if model.kind != "linear":
    return f"memory model kind={model.kind!r} is not linear, so a chunk's map is not affine"
  if model.residual_norm:
    return "residual_norm=True puts a LayerNorm in the gradient, so a chunk's map is not affine"
  if config.rule.kind == "lact":
    return "rule='lact' normalises each update, so a chunk's map is not affine"
  if config.loss not in _LOSS_TERMS:
    return f"loss={config.loss!r} has no affine gradient here (l2 and dot do)"
  return None


def _augment(weights: dict, bias: bool) -> Array:
  """{"w0": {"w": [..., d, d], "b": [..., d]}} -> W~ [..., d, d(+1)]."""
  w = weights["w0"]["w"]
  return jnp.concatenate([w, weights["w0"]["b"][..., None]], -1) if bias else w


def _split(x: Array, bias: bool) -> dict:
  layer = {"w": x[..., :-1] if bias else x}
  if bias:
    layer["b"] = x[..., -1]
  return {"w0": layer}


# How the composed maps multiply in float32 (float64 maps always use float64 arithmetic).
MAP_PRECISIONS = {
    "highest": jax.lax.Precision.HIGHEST,                   # float32 arithmetic
    "bf16_3x": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3,  # ~float32 accuracy, tensor cores
    "tf32_3x": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
}


def _einsum_at(precision):
  return lambda eq, x, y: jnp.einsum(eq, x, y, precision=precision)


class _Chunk(NamedTuple):
  """One chunk per lane, leaves [..., C, *] or [...]: what its map needs."""
  k: Array        # K~ [..., C, d~] (accumulation dtype, compute-dtype values)
  v: Array        # V  [..., C, d]
  p: Array        # W from W0
  q: Array        # W from S0
  x: Array        # [..., C] W from each token's gradient (includes -theta)
  r: Array        # S from S0
  s: Array        # [..., C] S from each token's gradient


def _advance(state, chunk: _Chunk, lam: float, mu: float, with_v: bool, mm):
  """Rows of states [W~ rows | S~ rows] ([..., R, d~] each) through one chunk's map: the affine
  map when with_v (R = d, real states), its linear part otherwise (rows of a composed map).
  mm: the einsum at the maps' precision."""
  w, s = state
  err = lam * mm("...rd,...cd->...rc", w, chunk.k)          # lam W~ k~_j per row
  if with_v:
    err = err - mu * jnp.swapaxes(chunk.v, -1, -2)
  bc = lambda c: c[..., None, None]
  w_next = bc(chunk.p) * w + mm("...rc,...cd->...rd", err * chunk.x[..., None, :], chunk.k)
  if s is None:
    return w_next, None
  w_next = w_next + bc(chunk.q) * s
  s_next = bc(chunk.r) * s + mm("...rc,...cd->...rd", err * chunk.s[..., None, :], chunk.k)
  return w_next, s_next


def _compose(earlier, later, mm):
  """X -> (X A1 + B1) A2 + B2 for dense maps (A [..., m, m], B [..., d, m])."""
  (a1, b1), (a2, b2) = earlier, later
  return mm("...ij,...jk->...ik", a1, a2), mm("...ij,...jk->...ik", b1, a2) + b2


def default_block_chunks(num_chunks: int) -> int:
  """Chunks per block: ~sqrt(N) balances the two sequential passes (L steps each) against the
  number of blocks composed in parallel."""
  return max(1, math.isqrt(num_chunks - 1) + 1) if num_chunks > 1 else 1


def _chunks_in_blocks(k_c, v_c, end, bias, num_blocks, block, acc) -> _Chunk:
  """[N, B, H, ...] chunk arrays -> _Chunk with leaves [L, P, B, H, ...], padded at the end with
  identity chunks (p = r = 1, nothing else)."""
  k = k_c.astype(acc)
  if bias:
    k = jnp.concatenate([k, jnp.ones(k.shape[:-1] + (1,), acc)], -1)
  chunk = _Chunk(k, v_c, end.w_from_w0, end.w_from_s0, end.w_from_x, end.s_from_s0,
                 end.s_from_x)
  pad = num_blocks * block - k_c.shape[0]
  fills = _Chunk(0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0)

  def blocked(x, fill):
    x = x.astype(acc)
    if pad:
      x = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, acc)], 0)
    return jnp.swapaxes(x.reshape((num_blocks, block) + x.shape[1:]), 0, 1)

  return _Chunk(*(blocked(x, f) for x, f in zip(chunk, fills)))


def affine_memory(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, gates: Gates,
                  state: MemoryState, slow: dict, config: MemoryConfig, *,
                  block_chunks: int | None = None, map_precision: str = "highest"):
  """Same contract as `reference_memory` (see ops/api.py), for configs `unsupported_reason`
  accepts. block_chunks: chunks per block (L); None: default_block_chunks(N). map_precision:
  a MAP_PRECISIONS name, how float32 maps multiply (float64 maps: always float64)."""
  if map_precision not in MAP_PRECISIONS:
    raise ValueError(f"map_precision={map_precision!r} is unknown; expected one of "
                     f"{tuple(MAP_PRECISIONS)}")
  if block_chunks is not None and (not isinstance(block_chunks, int)
                                   or isinstance(block_chunks, bool) or block_chunks < 1):
    raise ValueError(f"block_chunks={block_chunks!r} must be an integer >= 1")
  reason = unsupported_reason(config)
  if reason is not None:
    raise ValueError(f"implementation='affine' cannot run this memory: {reason}")
  step, (w0, s0), xs, num_chunks = chunkwise.chunk_scan(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates,
                                                        state, slow, config)
  block = min(default_block_chunks(num_chunks) if block_chunks is None else block_chunks,
              num_chunks)
  num_blocks = -(-num_chunks // block)
  bias, has_s = config.model.bias, config.rule.has_momentum
  lam, mu = _LOSS_TERMS[config.loss]
  acc = jax.tree.leaves(w0)[0].dtype
  mm = _einsum_at(MAP_PRECISIONS[map_precision] if acc == jnp.float32
                  else jax.lax.Precision.HIGHEST)
  _, k_c, v_c, coefs = xs
  chunks = _chunks_in_blocks(k_c, v_c, chunkwise.chunk_end(coefs, config.read), bias,
                             num_blocks, block, acc)                      # leaves [L, P, B, H, ...]
  lanes = chunks.p.shape[1:]                                              # (P, B, H)
  width = chunks.k.shape[-1]                                              # d~
  d = w0["w0"]["w"].shape[-1]
  m = width * (2 if has_s else 1)

  # 1. Each block's map, composed over its L chunks for all blocks at once: the linear part acts
  #    on the m rows of the identity, the affine part on d zero rows.
  eye = jnp.broadcast_to(jnp.eye(m, dtype=acc), lanes + (m, m))
  zero = jnp.zeros(lanes + (d, m), acc)
  split = lambda x: (x[..., :width], x[..., width:] if has_s else None)
  join = lambda ws: ws[0] if ws[1] is None else jnp.concatenate(ws, -1)

  def compose_block(maps, chunk):
    a, b = maps
    return (join(_advance(split(a), chunk, lam, mu, False, mm)),
            join(_advance(split(b), chunk, lam, mu, True, mm))), None

  (block_a, block_b), _ = jax.lax.scan(compose_block, (eye, zero), chunks)

  # 2. The blocks' maps composed across blocks (log depth); block n starts from the composition
  #    of blocks 0..n-1 applied to the initial state.
  x0 = _augment(w0, bias)
  if has_s:
    x0 = jnp.concatenate([x0, _augment(s0, bias)], -1)                   # [B, H, d, m]
  prefix_a, prefix_b = jax.lax.associative_scan(lambda e, l: _compose(e, l, mm),
                                                (block_a, block_b), axis=0)
  after = mm("bhij,pbhjk->pbhik", x0, prefix_a) + prefix_b
  block_starts = jnp.concatenate([x0[None], after[:-1]], 0)              # [P, B, H, d, m]

  # 3. Every chunk's start state: each block's L chunks in sequence, all blocks at once.
  def chunk_start(x, chunk):
    return join(_advance(split(x), chunk, lam, mu, True, mm)), x

  _, starts = jax.lax.scan(chunk_start, block_starts, chunks)           # [L, P, B, H, d, m]
  starts = jnp.swapaxes(starts, 0, 1).reshape((num_blocks * block,) + starts.shape[2:])
  starts = starts[:num_chunks]

  carry = lambda x: tuple(None if part is None else _split(part, bias) for part in split(x))
  out_N = jax.vmap(lambda x, chunk_xs: step(carry(x), chunk_xs)[1])(starts, xs)
  w_final, s_final = carry(after[-1])
  out = chunkwise._from_chunks(out_N, q_BxTxHxD.shape[1]).astype(q_BxTxHxD.dtype)
  return out, MemoryState(w_final, s_final)
