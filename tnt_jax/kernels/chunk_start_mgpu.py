"""Mosaic GPU (Hopper wgmma) kernels for large chunk-start chunks: TNT's global memory (SPEC §1.4).

A chunk read at its start is a map over its tokens at the chunk-start state W0 and one reduction
over them (kernels/chunk_start.py):

    out_t = f(W0; q_t)
    W1 = p W0 + q S0 + sum_t c_t delta_t a_t^T,   S1 = r S0 + sum_t s_t delta_t a_t^T

Here both halves run on Pallas' Mosaic GPU lowering (`plgpu`), every matmul an explicit `wgmma`
on 64-token tiles (a warpgroup's M) staged in swizzled shared memory, accumulating in float32:

- pass 1, grid (row, token split): per tile the keys' forward at W0 and the loss gradient
  E = dl/dy ([T, d] float32), and the read out_t. No [T, hidden] array leaves the chip.
- pass 2, grid (row, slice of the layer's input units, token split): a split-K reduction. Each
  program loops over its split's tiles keeping its output block in float32 registers: for the
  mlp (Z = K W1^T, A = act(Z), D = (E W2) * act'(Z), on `slice_width` hidden units at a time)

      (c E)^T A_j,  (s E)^T A_j,  K^T (c D_j),  K^T (s D_j)        four [d, h_s] accumulators

  and for a linear memory (c E)^T K_j, (s E)^T K_j. XLA sums the few splits.

Every operand is rounded to the compute dtype exactly where XLA's path (ops/chunkwise.py) rounds
it, so the two agree to accumulation order. The token-contracted operands enter pass 2 already
feature-major ((c E)^T, (s E)^T, K^T: one XLA fusion per chunk over [R, C, d] arrays), so no
kernel operand is a transposed shared-memory view; W1^T and W2^T (a few KiB per row) likewise.
That keeps the kernels runnable by the Mosaic GPU interpreter (InterpretGPUParams), whose wgmma
takes no transposed refs, so the tests run the very code the GPU compiles.

Backward (`jax.custom_vjp`): recomputed with XLA, the vjp of the same map and sums in jnp (the
issue's first version; docs/kernel.md). Version 1 runs its tiles synchronously (copy, wait,
compute): no multi-buffered TMA pipeline and no warp specialisation yet.

Selected by `KernelBlocks(tile=..., tile_lowering="mosaic_gpu")` for a chunk-start read past the
row kernel's activation limit; `unsupported_reason` says when it cannot run (ops/api.py then
falls back to XLA with the reason logged).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tnt_jax.kernels.step_math import act_and_grad
from tnt_jax.platform import target_device_kind, target_platform

TILE = 64                 # tokens per wgmma tile: one warpgroup's M
HIDDEN_CHUNK = 128        # hidden units per pass-1 Z accumulator ([64, 128] f32: 64 regs/thread)
ACC_ELEMENTS = 64 * 64    # per pass-2 accumulator: four of them are 128 f32 regs/thread
HEAD_DIMS = (64, 128)     # wgmma M for the [d, h_s] accumulators and the swizzle width
DTYPES = (jnp.dtype(jnp.bfloat16),)   # tested; wgmma would run float32 as tf32


def slice_width(head_dim: int, in_units: int) -> int:
  """Input units per pass-2 program: four [d, h_s] float32 accumulators in 128 regs/thread at
  d = 64. At least 64: narrower accumulators fail Mosaic GPU's layout inference (jax 0.10.2),
  so at d = 128 a Titans program holds 256 accumulator registers per thread."""
  return min(in_units, max(64, ACC_ELEMENTS // head_dim))


def program_tile(chunk: int, tile: int) -> int:
  """Tokens per program: KernelBlocks.tile rounded up to a whole wgmma tile, at most the chunk
  rounded up to a power of 2 (>= TILE)."""
  whole = max(TILE, 1 << (chunk - 1).bit_length())
  return min(max(tile, TILE), whole)


SMEM_BYTES = 227 * 1024   # an H100's shared memory per block


def map_pass_smem_bytes(head_dim: int, hidden: int) -> int:
  """Pass 1's shared memory at 2-byte operands: both layers' W^T (resident for the program),
  the key/value/out tiles, one hidden chunk's activations and the float32 E tile."""
  weights = 2 * head_dim * hidden * 2 if hidden else head_dim * head_dim * 2
  return weights + 3 * TILE * head_dim * 2 + TILE * max(min(hidden, HIDDEN_CHUNK), 64) * 2 \
      + TILE * head_dim * 4


def unsupported_reason(model, head_dim: int, dtype, *, compiled: bool) -> str | None:
  """Why these kernels cannot run a chunk-start read of this memory (None when they can).
  compiled: on a GPU rather than the interpreter."""
  if model.kind not in ("linear", "mlp") or (model.kind == "mlp" and model.depth != 2):
    return (f"memory model kind={model.kind!r} depth={getattr(model, 'depth', 1)} (the Mosaic "
            "GPU tile kernels do linear and 2-layer mlp memories)")
  if (reason := operand_reason("tile kernels", head_dim, dtype)) is not None:
    return reason
  hidden = model.hidden_dim(head_dim) if model.kind == "mlp" else 0
  if hidden and (hidden % 64 or hidden % min(hidden, HIDDEN_CHUNK)):
    return (f"mlp hidden width {hidden} must be a multiple of 64, and of {HIDDEN_CHUNK} above "
            f"{HIDDEN_CHUNK}")
  if (need := map_pass_smem_bytes(head_dim, hidden)) > SMEM_BYTES:
    return (f"pass 1 keeps W0 in shared memory: {need} bytes at head_dim={head_dim}, hidden "
            f"{hidden} > {SMEM_BYTES} (expansion={model.expansion})")
  return hopper_reason("tile kernels") if compiled else None


def operand_reason(kernels: str, head_dim: int, dtype) -> str | None:
  """Why Mosaic GPU wgmma kernels cannot take these operands (None when they can)."""
  if jnp.dtype(dtype) not in DTYPES:
    return (f"dtype={jnp.dtype(dtype).name} (Mosaic GPU {kernels}: bfloat16 only, as wgmma "
            "would round float32 to tf32)")
  if head_dim not in HEAD_DIMS:
    return f"head_dim={head_dim} (Mosaic GPU {kernels}: head_dim in {HEAD_DIMS})"
  return None


def hopper_reason(kernels: str) -> str | None:
  """Why this platform cannot compile Mosaic GPU wgmma kernels (None on a Hopper GPU)."""
  if target_platform() != "gpu":
    return (f"platform={target_platform()!r}: Mosaic GPU kernels run on NVIDIA Hopper "
            "GPUs (or interpreted)")
  kind = target_device_kind()
  if not any(name in kind for name in ("H100", "H200", "H800")):
    return f"device_kind={kind!r}: the Mosaic GPU {kernels} need a Hopper GPU (wgmma)"
  return None


def _plgpu():
  import jax.experimental.pallas.mosaic_gpu as plgpu   # imported late: CPU-only installs
  return plgpu


def _interpret_params(interpret):
  if not interpret:
    return None
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams()


def _smem(shape, dtype, swizzle=None):
  """A shared-memory buffer laid out for TMA and wgmma: 8-row tiles, swizzled rows (by default
  the widest swizzle the row takes; a wgmma's two shared-memory operands need the same one)."""
  plgpu = _plgpu()
  dtype = jnp.dtype(dtype)
  swizzle = swizzle or plgpu.find_swizzle(shape[-1] * dtype.itemsize * 8)
  if len(shape) == 1:
    return plgpu.SMEM(shape, dtype)
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, swizzle // dtype.itemsize)), plgpu.SwizzleTransform(swizzle)))


def _mm(a, b, shape):
  """a [M, K] @ b [K, N] on the tensor cores, float32 result in registers."""
  plgpu = _plgpu()

  def run(acc):
    plgpu.wgmma(acc, a, b)
    return acc[...]

  return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _with_accumulators(fn, shapes):
  """fn(*acc_refs) with zeroed float32 wgmma accumulators of these shapes."""
  plgpu = _plgpu()
  return pl.run_scoped(fn, *[plgpu.ACC(shape, jnp.float32) for shape in shapes])


def _load(pairs, barrier):
  """Copy each (gmem view, smem buffer) pair with TMA and wait for all of them."""
  plgpu = _plgpu()
  for i, (src, dst) in enumerate(pairs):
    plgpu.copy_gmem_to_smem(src, dst, barrier.at[i])
  for i in range(len(pairs)):
    plgpu.barrier_wait(barrier.at[i])


def _store(value, buffer, dst):
  """Registers -> shared buffer -> HBM view, waiting until the buffer may be reused."""
  plgpu = _plgpu()
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  buffer[...] = value.astype(buffer.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(buffer, dst)


def _split_k(tile_step, parts, buffer, at, shape, tiles):
  """A split-K program: zeroed accumulators, tile_step(tokens, accs) for each of the split's
  `tiles` wgmma tiles, then each accumulator stored to its partial at (row, split, :, cols)."""
  plgpu = _plgpu()
  r, split, cols = at

  def accumulate(*accs):
    @pl.loop(0, tiles)
    def _(u):
      tile_step(pl.ds((split * tiles + u) * TILE, TILE), accs)
      plgpu.wgmma_wait(0)            # the tile's buffers are refilled next iteration

    for acc, part in zip(accs, parts):
      _store(acc[...], buffer, part.at[r, split, :, cols])

  _with_accumulators(accumulate, [shape] * len(parts))
  plgpu.wait_smem_to_gmem(0)


def map_pass(weights_t, q, k, v, *, activation: str, l2: bool, tile: int, interpret):
  """Pass 1. weights_t: [R, in, out] per layer (W^T), compute dtype; q, k, v [R, C, d].
  Returns (out [R, C, d] compute dtype, E [R, C, d] float32 or None for the dot loss)."""
  plgpu = _plgpu()
  rows, chunk, d = q.shape
  cd = q.dtype
  depth = len(weights_t)
  hidden = weights_t[0].shape[-1] if depth == 2 else 0
  step = min(hidden, HIDDEN_CHUNK)
  sub = tile // TILE

  def chain(x_s, w_s, a_s):
    """f(W0; x) [T, d] float32 for the tile in x_s."""
    if depth == 1:
      return _mm(x_s, w_s[0], (TILE, d))

    def accumulate(y):
      for c in range(hidden // step):
        cols = pl.ds(c * step, step)
        z = _mm(x_s, w_s[0].at[:, cols], (TILE, step))
        # One [T, step] buffer serves every hidden chunk: reading z waited for the previous
        # chunk's wgmma, the buffer's last reader.
        a_s[...] = act_and_grad(activation, z)[0].astype(cd)
        plgpu.commit_smem()
        plgpu.wgmma(y, a_s, w_s[1].at[cols, :])
      return y[...]

    return _with_accumulators(accumulate, [(TILE, d)])

  def body(*refs):
    w_g = refs[:depth]
    q_g, k_g, v_g, out_g = refs[depth:depth + 4]
    e_g = refs[depth + 4] if l2 else None
    (w_s, x_s, v_s, a_s, o_s, e_s, barrier) = refs[depth + 4 + l2:]
    r, split = lax.axis_index("rows"), lax.axis_index("splits")
    _load([(w_g[i].at[r], w_s[i]) for i in range(depth)], barrier)

    @pl.loop(0, sub)
    def _(u):
      tokens = pl.ds((split * sub + u) * TILE, TILE)
      if l2:
        _load([(k_g.at[r, tokens], x_s), (v_g.at[r, tokens], v_s)], barrier)
        y = chain(x_s, w_s, a_s)
        _store(2.0 * (y - v_s[...].astype(jnp.float32)), e_s, e_g.at[r, tokens])
      _load([(q_g.at[r, tokens], x_s)], barrier)
      _store(chain(x_s, w_s, a_s), o_s, out_g.at[r, tokens])

    plgpu.wait_smem_to_gmem(0)

  out_types = [jax.ShapeDtypeStruct((rows, chunk, d), cd)]
  if l2:
    out_types.append(jax.ShapeDtypeStruct((rows, chunk, d), jnp.float32))
  scratch = [[_smem(w.shape[1:], cd) for w in weights_t], _smem((TILE, d), cd),
             _smem((TILE, d), cd), _smem((TILE, max(step, 64)), cd), _smem((TILE, d), cd),
             _smem((TILE, d), jnp.float32), plgpu.Barrier(num_barriers=max(depth, 2))]
  results = plgpu.kernel(
      body, out_type=out_types, scratch_types=scratch, grid=(rows, chunk // tile),
      grid_names=("rows", "splits"), interpret=_interpret_params(interpret),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup))(*weights_t, q, k, v)
  return (results[0], results[1]) if l2 else (results[0], None)


def reduce_pass(weights, k, e, c_w, c_s, *, activation: str, tile: int, interpret):
  """Pass 2: per layer and coefficient the chunk's sum_t coef_t delta_t a_t^T, [R, out, in]
  float32. weights: the rows' W0 [R, out, in] per layer, compute dtype; k [R, C, d]; e [R, C, d]
  float32 (dl/dy); c_w, c_s [R, C, 1] float32 (c_s None without momentum).
  Returns ([sum c_w ... per layer], [sum c_s ... per layer] or [])."""
  plgpu = _plgpu()
  rows, chunk, d = k.shape
  cd = k.dtype
  has_s = c_s is not None
  coefs = [c_w] + ([c_s] if has_s else [])
  # Feature-major operands of the token contraction, rounded where XLA's path rounds them.
  scaled_t = [jnp.swapaxes((c * e).astype(cd), 1, 2) for c in coefs]      # [R, d, C]
  depth = len(weights)
  in_units = weights[0].shape[-1] if depth == 1 else weights[0].shape[1]   # [R, h, d]: h
  width = slice_width(d, in_units)
  sub = tile // TILE
  grid = (rows, in_units // width, chunk // tile)
  n = len(coefs)
  n_out = n if depth == 1 else 2 * n

  if depth == 1:
    inputs = [k] + scaled_t

    def body(k_g, *refs):
      st_g, part_g = refs[:n], refs[n:2 * n]
      k_s, st_s, p_s, barrier = refs[2 * n:]
      r, j, split = (lax.axis_index(a) for a in ("rows", "slices", "splits"))
      cols = pl.ds(j * width, width)

      def tile_step(tokens, accs):
        _load([(k_g.at[r, tokens, cols], k_s)]
              + [(g.at[r, :, tokens], s) for g, s in zip(st_g, st_s)], barrier)
        for acc, s in zip(accs, st_s):
          plgpu.wgmma(acc, s, k_s)

      _split_k(tile_step, part_g, p_s, (r, split, cols), (d, width), sub)

    scratch = [_smem((TILE, width), cd), [_smem((d, TILE), cd) for _ in range(n)],
               _smem((d, width), jnp.float32), plgpu.Barrier(num_barriers=n + 1)]
  else:
    w1, w2 = weights                                   # [R, h, d], [R, d, h]
    inputs = [jnp.swapaxes(w1, 1, 2), w2, k, jnp.swapaxes(k, 1, 2), e.astype(cd),
              c_w[..., 0]] + ([c_s[..., 0]] if has_s else []) + scaled_t

    def body(w1t_g, w2_g, k_g, kt_g, eb_g, *refs):
      coef_g, st_g, part_g = refs[:n], refs[n:2 * n], refs[2 * n:4 * n]
      (w1_s, w2_s, k_s, kt_s, e_s, coef_s, st_s, a_s, dd_s, p_s, barrier) = refs[4 * n:]
      r, j, split = (lax.axis_index(a) for a in ("rows", "slices", "splits"))
      cols = pl.ds(j * width, width)
      _load([(w1t_g.at[r, :, cols], w1_s), (w2_g.at[r, :, cols], w2_s)], barrier)

      def tile_step(tokens, accs):
        _load([(k_g.at[r, tokens], k_s), (kt_g.at[r, :, tokens], kt_s),
               (eb_g.at[r, tokens], e_s)]
              + [(g.at[r, tokens], s) for g, s in zip(coef_g, coef_s)]
              + [(g.at[r, :, tokens], s) for g, s in zip(st_g, st_s)], barrier)
        a, da = act_and_grad(activation, _mm(k_s, w1_s, (TILE, width)))
        a_s[...] = a.astype(cd)
        dd = _mm(e_s, w2_s, (TILE, width)) * da                  # delta_1 on this slice
        for coef, buf in zip(coef_s, dd_s):
          buf[...] = (lax.broadcast_in_dim(coef[...], (TILE, width), [0]) * dd).astype(cd)
        plgpu.commit_smem()
        for acc, s in zip(accs[:n], st_s):                       # layer 2: (coef E)^T A_j
          plgpu.wgmma(acc, s, a_s)
        for acc, buf in zip(accs[n:], dd_s):                     # layer 1: K^T (coef D_j)
          plgpu.wgmma(acc, kt_s, buf)

      _split_k(tile_step, part_g, p_s, (r, split, cols), (d, width), sub)

    scratch = [_smem((d, width), cd), _smem((d, width), cd), _smem((TILE, d), cd),
               _smem((d, TILE), cd), _smem((TILE, d), cd),
               [_smem((TILE,), jnp.float32) for _ in range(n)],
               [_smem((d, TILE), cd) for _ in range(n)], _smem((TILE, width), cd),
               [_smem((TILE, width), cd) for _ in range(n)], _smem((d, width), jnp.float32),
               plgpu.Barrier(num_barriers=5 + 2 * n)]

  part_shape = (rows, chunk // tile, d, in_units)        # a [d, width] block per program

  partials = plgpu.kernel(
      body, out_type=[jax.ShapeDtypeStruct(part_shape, jnp.float32)] * n_out,
      scratch_types=scratch, grid=grid, grid_names=("rows", "slices", "splits"),
      interpret=_interpret_params(interpret),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup))(*inputs)
  sums = [p.sum(axis=1) for p in partials]
  if depth == 1:
    return sums[:1], sums[1:]
  k_coefs = len(coefs)
  second, first = sums[:k_coefs], [jnp.swapaxes(x, 1, 2) for x in sums[k_coefs:]]
  by_coef = [[first[i], second[i]] for i in range(k_coefs)]   # layer order (w1, w2)
  return by_coef[0], (by_coef[1] if has_s else [])
