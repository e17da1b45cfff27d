"""Tiled Pallas kernel for large chunks read at the chunk start (TNT's global memory, SPEC §1.4).

With a chunk-start read every token of a chunk reads, and takes its gradient, at the chunk-start
state W0. A chunk is therefore a map over its tokens followed by one reduction over them:

    out_t = f(W0; q_t)                                    (the read)
    W1 = p W0 + q S0 + sum_j c_j delta_j a_j^T            (delta_j, a_j: per layer, at W0)
    S1 =        r S0 + sum_j s_j delta_j a_j^T

The row kernel (chunk_memory.py) keeps a whole chunk's activations in registers, which caps its
chunk at C x widest layer <= KernelBlocks.max_chunk_activations; a chunk of 2048 is far past that.
Here the map is the kernel ("tile pass"): a grid over (row, tile of `KernelBlocks.tile` tokens),
each program runs the model's keys/read graph (the row kernel's `model_graph`) on its tile at W0
with every float32 activation on chip, and writes only what the reduction needs, in the compute
dtype: per layer (c * delta), (s * delta) and the layer's input a (the keys themselves are not
rewritten). Those are exactly the operands XLA's path (ops/chunkwise.py) rounds for its outer
products, so the two agree to accumulation order. The reduction is then one matmul per layer and
coefficient with the chunk's tokens as its contraction (large, XLA's GEMM), and the momentum/decay
combine is elementwise; the chunks run in a `lax.scan` (ops/chunkwise.scan_chunks: unrolled for
<= 16 chunks, ~sqrt(N)-checkpointed beyond).

Backward (`jax.custom_vjp` on the tile pass): a second grid over the same tiles evaluates the vjp
of the same tile function (traced inside the kernel body, `one_dtype_per_matmul`, as the row
kernel's reverse kernel does) and writes dq, dk, dv, the coefficients' cotangents, and each
tile's partial dW0 ([rows, tiles, out, in] float32), which XLA sums over tiles. The GEMMs' and
the combine's gradients are autodiff's.

S0 never enters the kernel, so the programs hold only W0 (read-only) and their tile.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from tnt_jax.kernels import chunk_memory as cm
from tnt_jax.kernels import chunk_start_mgpu
from tnt_jax.kernels.step_math import ChunkLayout, dot, one_dtype_per_matmul
from tnt_jax.memory.config import MemoryConfig
from tnt_jax.memory.rules import MemoryState
from tnt_jax.ops import chunkwise

Array = jax.Array


def key_input_layers(model, depth: int) -> tuple:
  """Per layer, whether its input is the keys themselves (then the GEMM reads k directly)."""
  first = 2 if model.kind == "swiglu" else 1         # swiglu: w1 and w3 both take x
  return tuple(i < first for i in range(depth))


def tile_size(chunk_size: int, blocks: cm.KernelBlocks, driver: str) -> int:
  """Tokens per program: KernelBlocks.tile, or the chunk rounded up to a power of 2 when that is
  smaller (>= 16 on the GPU driver, whose matmuls need every dimension >= 16). The Mosaic GPU
  kernels take whole 64-token wgmma tiles (chunk_start_mgpu.program_tile)."""
  if blocks.tile_lowering == "mosaic_gpu":
    return chunk_start_mgpu.program_tile(chunk_size, blocks.tile)
  whole = 1 << (chunk_size - 1).bit_length()
  tile = min(blocks.tile, whole)
  return max(tile, cm.MIN_GPU_CHUNK) if driver == "chunk_loop" else tile


class _TileStatic(NamedTuple):
  config: MemoryConfig
  has_momentum: bool
  tile: int
  driver: str
  interpret: object
  blocks: cm.KernelBlocks


def _tile_fn(static: _TileStatic, weights, q, k, v, c_w, c_s):
  """One tile at W0. weights: [out, in] per layer, in the compute dtype; q, k, v: [T, d];
  c_w, c_s: [T, 1] float32 (c_s None without momentum). Returns (out [T, d],
  [c_w * delta per layer], [c_s * delta per layer], [input per layer not fed by the keys]), all
  in the compute dtype."""
  config = static.config
  cd = q.dtype
  acc = jnp.promote_types(cd, jnp.float32)
  lay = ChunkLayout("tokens", cd)
  graph = cm.model_graph(config.model)
  act = config.model.activation
  loss_grad = cm.loss_gradient(config, v.astype(acc))
  inputs, deltas = graph(weights, k.astype(acc), None, lay, act, loss_grad)
  out = graph(weights, q.astype(acc), lambda i, x: lay.apply(weights[i], x), lay, act, None)
  scaled_w = [(c_w * d).astype(cd) for d in deltas]
  scaled_s = [] if c_s is None else [(c_s * d).astype(cd) for d in deltas]
  keyed = key_input_layers(config.model, len(weights))
  fed = [a.astype(cd) for a, is_key in zip(inputs, keyed) if not is_key]
  return out.astype(cd), scaled_w, scaled_s, fed


def _compiler_params(static: _TileStatic, backward: bool):
  if static.driver == "chunk_loop" and not static.interpret:
    from jax.experimental.pallas import triton as pltriton
    # The row kernel's warps (8 for an mlp, 4 for a linear memory) suit a tile too: at T = 32
    # an mlp tile's [32, 256] float32 activations do not spill (experiments/kernel_ptx.py).
    return pltriton.CompilerParams(**cm._gpu_params(static, backward))
  if static.driver == "sequential_grid" and static.interpret is not True:
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
  return None


def _tile_spec(shape, tile):
  """[R, C, w] arrays, one (row, tile) block [T, w] per program."""
  return pl.BlockSpec((None, tile, shape[-1]), lambda r, t: (r, t, 0))


def _row_spec(shape):
  """[R, out, in] arrays: the whole row's block for every tile."""
  return pl.BlockSpec((None,) + tuple(shape[1:]), lambda r, t: (r,) + (0,) * (len(shape) - 1))


def _grid(static: _TileStatic, q):
  rows, chunk = q.shape[:2]
  return rows, chunk // static.tile


def _out_shapes(static: _TileStatic, weights, q):
  """ShapeDtypeStructs of the tile pass's outputs over a whole chunk [R, C, ...]."""
  rows, chunk = q.shape[:2]
  cd = q.dtype
  sds = lambda width: jax.ShapeDtypeStruct((rows, chunk, width), cd)
  outs = [w.shape[1] for w in weights]                 # rows' [R, out, in]: out at axis 1
  ins = [w.shape[2] for w in weights]
  keyed = key_input_layers(static.config.model, len(weights))
  return ([sds(q.shape[-1])], [sds(o) for o in outs],
            [sds(o) for o in outs] if static.has_momentum else [],
            [sds(i) for i, is_key in zip(ins, keyed) if not is_key])


def _tile_forward(static: _TileStatic, weights, q, k, v, c_w, c_s):
  """The tile pass over one chunk of every row: weights [R, out, in] per layer; q, k, v
  [R, C, d]; c_w, c_s [R, C, 1]. Returns _tile_fn's outputs, each [R, C, width]."""
  depth = len(weights)
  has_s = c_s is not None
  shapes = _out_shapes(static, weights, q)
  counts = [len(group) for group in shapes]
  flat_shapes = [s for group in shapes for s in group]

  def kernel(*refs):
    w_refs, (q_ref, k_ref, v_ref, cw_ref), rest = refs[:depth], refs[depth:depth + 4], \
        refs[depth + 4:]
    cs_ref, out_refs = (rest[0], rest[1:]) if has_s else (None, rest)
    outputs = _tile_fn(static, [r[...] for r in w_refs], q_ref[...], k_ref[...], v_ref[...],
                       cw_ref[...], None if cs_ref is None else cs_ref[...])
    out, *lists = outputs
    for ref, value in zip(out_refs, [out] + [x for group in lists for x in group]):
      ref[...] = value.astype(ref.dtype)

  inputs = list(weights) + [q, k, v, c_w] + ([c_s] if has_s else [])
  in_specs = [_row_spec(w.shape) for w in weights]
  in_specs += [_tile_spec(x.shape, static.tile) for x in inputs[depth:]]
  results = pl.pallas_call(
      kernel, out_shape=flat_shapes, grid=_grid(static, q), in_specs=in_specs,
      out_specs=[_tile_spec(s.shape, static.tile) for s in flat_shapes],
      compiler_params=_compiler_params(static, backward=False), interpret=static.interpret,
      name=f"chunk_start_tiles_fwd_{static.config.model.kind}")(*inputs)
  results, grouped = list(results), []
  for count in counts:
    grouped.append(results[:count])
    results = results[count:]
  out, scaled_w, scaled_s, fed = grouped
  return out[0], scaled_w, scaled_s, fed


def _tile_backward(static: _TileStatic, weights, q, k, v, c_w, c_s, cotangents):
  """vjp of the tile pass, a program per (row, tile): (d_weights [R, out, in] summed over the
  tiles, dq, dk, dv, dc_w, dc_s)."""
  depth = len(weights)
  has_s = c_s is not None
  rows, tiles = _grid(static, q)
  d_out, d_scaled_w, d_scaled_s, d_fed = cotangents
  flat_cot = [d_out] + list(d_scaled_w) + list(d_scaled_s) + list(d_fed)
  groups = (1, len(d_scaled_w), len(d_scaled_s), len(d_fed))
  acc = jnp.promote_types(q.dtype, jnp.float32)

  def kernel(*refs):
    w_refs = refs[:depth]
    at = depth
    q_ref, k_ref, v_ref, cw_ref = refs[at:at + 4]
    at += 4
    cs_ref = None
    if has_s:
      cs_ref = refs[at]
      at += 1
    cot_refs = refs[at:at + len(flat_cot)]
    at += len(flat_cot)
    dw_refs = refs[at:at + depth]
    dq_ref, dk_ref, dv_ref, dcw_ref = refs[at + depth:at + depth + 4]
    dcs_ref = refs[at + depth + 4] if has_s else None

    cots, values = [], [r[...] for r in cot_refs]
    for size in groups:
      cots.append(values[:size])
      values = values[size:]
    cot_tree = (cots[0][0], cots[1], cots[2], cots[3])

    def tile_vjp(ws, qt, kt, vt, cwt, cst, cot):
      _, vjp = jax.vjp(functools.partial(_tile_fn, static), ws, qt, kt, vt, cwt, cst)
      return vjp(cot)

    d_ws, dq, dk, dv, dcw, dcs = one_dtype_per_matmul(tile_vjp)(
        [r[...] for r in w_refs], q_ref[...], k_ref[...], v_ref[...], cw_ref[...],
        None if cs_ref is None else cs_ref[...], cot_tree)
    for ref, value in zip(dw_refs, d_ws):
      ref[...] = value.astype(ref.dtype)
    for ref, value in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv), (dcw_ref, dcw)):
      ref[...] = value.astype(ref.dtype)
    if has_s:
      dcs_ref[...] = dcs.astype(dcs_ref.dtype)

  inputs = list(weights) + [q, k, v, c_w] + ([c_s] if has_s else []) + flat_cot
  in_specs = [_row_spec(w.shape) for w in weights]
  in_specs += [_tile_spec(x.shape, static.tile) for x in inputs[depth:]]
  partial_specs = [pl.BlockSpec((None, None) + tuple(w.shape[1:]), lambda r, t: (r, t, 0, 0))
                   for w in weights]
  partial_shapes = [jax.ShapeDtypeStruct((rows, tiles) + tuple(w.shape[1:]), acc)
                    for w in weights]
  token_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype)
                  for x in [q, k, v, c_w] + ([c_s] if has_s else [])]
  results = pl.pallas_call(
      kernel, out_shape=partial_shapes + token_shapes, grid=(rows, tiles), in_specs=in_specs,
      out_specs=partial_specs + [_tile_spec(s.shape, static.tile) for s in token_shapes],
      compiler_params=_compiler_params(static, backward=True), interpret=static.interpret,
      name=f"chunk_start_tiles_bwd_{static.config.model.kind}")(*inputs)
  d_weights = [p.sum(axis=1).astype(w.dtype) for p, w in zip(results[:depth], weights)]
  dq, dk, dv, dcw = results[depth:depth + 4]
  dcs = results[depth + 4] if has_s else None
  return d_weights, dq, dk, dv, dcw, dcs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tile_pass(static: _TileStatic, weights, q, k, v, c_w, c_s):
  return _tile_forward(static, weights, q, k, v, c_w, c_s)


def _tile_pass_fwd(static, weights, q, k, v, c_w, c_s):
  return _tile_forward(static, weights, q, k, v, c_w, c_s), (weights, q, k, v, c_w, c_s)


def _tile_pass_bwd(static, residuals, cotangents):
  weights, q, k, v, c_w, c_s = residuals
  d_weights, dq, dk, dv, dcw, dcs = _tile_backward(static, weights, q, k, v, c_w, c_s,
                                                   cotangents)
  return list(d_weights), dq, dk, dv, dcw, dcs


_tile_pass.defvjp(_tile_pass_fwd, _tile_pass_bwd)


def _outer_sum(scaled_RxCxO, inputs_RxCxI, compute_dtype):
  """sum over the chunk's tokens of scaled_j a_j^T per row: [R, out, in], with the kernels'
  matmul rounding (step_math.dot)."""
  return dot(scaled_RxCxO, inputs_RxCxI, compute_dtype, ((1,), (1,)), batch=((0,), (0,)))


def _reduce_tiles(static: _TileStatic, tile_outputs, k):
  """The tile map's outputs [R, C, ...] reduced over the chunk: (out, [sum_t c_w delta a^T per
  layer], [sum_t c_s delta a^T per layer]), the sums [R, out, in] float32."""
  out, scaled_w, scaled_s, fed = tile_outputs
  fed = iter(fed)
  inputs = [k if is_key else next(fed)
            for is_key in key_input_layers(static.config.model, len(scaled_w))]
  return (out, [_outer_sum(u, a, k.dtype) for u, a in zip(scaled_w, inputs)],
          [_outer_sum(u, a, k.dtype) for u, a in zip(scaled_s, inputs)])


def _chunk_sums(static: _TileStatic, weights, q, k, v, c_w, c_s):
  """`_reduce_tiles` of the tile map in jnp (XLA's path), for every row of one chunk."""
  tile_outputs = jax.vmap(functools.partial(_tile_fn, static))(weights, q, k, v, c_w, c_s)
  return _reduce_tiles(static, tile_outputs, k)


def _mosaic_sums(static: _TileStatic, weights, q, k, v, c_w, c_s):
  """_chunk_sums on the Mosaic GPU kernels (kernels/chunk_start_mgpu.py)."""
  config = static.config
  act = config.model.activation
  out, e = chunk_start_mgpu.map_pass([jnp.swapaxes(w, 1, 2) for w in weights], q, k, v,
                                     activation=act, l2=config.loss == "l2", tile=static.tile,
                                     interpret=static.interpret)
  if e is None:                                   # the dot loss: dl/dy = -v (loss_gradient)
    e = -v.astype(jnp.float32)
  sums_w, sums_s = chunk_start_mgpu.reduce_pass(weights, k, e, c_w, c_s, activation=act,
                                                tile=static.tile, interpret=static.interpret)
  return out, sums_w, sums_s


# The Mosaic GPU forward; its backward is the vjp of the same chunk in jnp (recomputed by XLA).
_mosaic_chunk = jax.custom_vjp(_mosaic_sums, nondiff_argnums=(0,))
_mosaic_chunk.defvjp(
    lambda static, *args: (_mosaic_sums(static, *args), args),
    lambda static, args, cot: jax.vjp(functools.partial(_chunk_sums, static), *args)[1](cot))


def tiled_chunk_start_memory(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, gates,
                             state: MemoryState, config: MemoryConfig, *, driver: str,
                             interpret, blocks: cm.KernelBlocks):
  """The chunk-start op with each chunk's map on the tile kernel: (outputs [B, T, H, D], final
  state), the contract of ops/api.py. Callers check `chunk_memory.unsupported_reason` first."""
  if config.read != "chunk_start":
    raise ValueError(f"the tiled kernel reads at the chunk start; config.read={config.read!r}")
  _, t, _, d = q_BxTxHxD.shape
  chunk = config.chunk_size
  tile = tile_size(chunk, blocks, driver)
  padded = -(-chunk // tile) * tile                       # identity tokens fill the last tile
  n = -(-t // chunk)
  cd = q_BxTxHxD.dtype
  acc = jnp.promote_types(cd, jnp.float32)
  names = list(config.model.layer_shapes(d))
  has_s = state.momentum is not None
  static = _TileStatic(config, has_s, tile, driver, interpret, blocks)
  to_chunks = lambda x: jnp.moveaxis(cm._pad_chunks(cm._rows(x, n, chunk), padded), 1, 0)
  q, k, v = (to_chunks(x) for x in (q_BxTxHxD, k_BxTxHxD, v_BxTxHxD))   # [N, R, C, d]
  coefs = cm.chunk_coefficients(gates, config, t, acc, padded)
  chunk_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
  coef_xs = [chunk_major(getattr(coefs, f))
             for f in ("end_w0", "end_s0", "end_ss0", "end_x", "end_sx")]
  weights0 = cm._state_rows(state.weights, names, acc)
  momentum0 = cm._state_rows(state.momentum, names, acc) if has_s else None

  def step(carry, xs):
    w0, s0 = carry
    qc, kc, vc, (p, q_coef, r, c_w, c_s) = xs
    # The kernel's matmuls read W0 in the compute dtype; casting once here halves what every
    # program loads and holds (the cast is the one the matmuls would make).
    w0_cd = [w.astype(cd) for w in w0]
    if blocks.tile_lowering == "mosaic_gpu":
      out, sums_w, sums_s = _mosaic_chunk(static, w0_cd, qc, kc, vc, c_w, c_s)
    else:
      out, sums_w, sums_s = _reduce_tiles(
          static, _tile_pass(static, w0_cd, qc, kc, vc, c_w, c_s), kc)
    # p, q_coef, r: [R, 1, 1] against the [R, out, in] states.
    w1 = [p * w + sw for w, sw in zip(w0, sums_w)]
    s1 = None
    if has_s:
      w1 = [w + q_coef * s for w, s in zip(w1, s0)]
      s1 = [r * s + ss for s, ss in zip(s0, sums_s)]
    return (w1, s1), out

  xs = (q, k, v, tuple(coef_xs))
  (w_final, s_final), out_N = chunkwise.scan_chunks(
      step, (weights0, momentum0), xs, n, chunkwise.default_unroll(n))
  return cm.from_rows(jnp.moveaxis(out_N, 0, 1), w_final, s_final, names, q_BxTxHxD.shape,
                     chunk, cd)
