"""Mosaic GPU (Hopper wgmma) forward of the row kernel for a linear memory at small chunks.

The row kernel (kernels/chunk_memory.py) runs one program per (batch, head) row over the row's
chunks in order, carrying the state on chip. This is its forward for `f(W; x) = W x` on Pallas'
Mosaic GPU lowering, the issue's GPU backend, in the "features" layout: a chunk's activations are
[d, C], so the head dim d is every wgmma's M (64 rows: one warpgroup) and the chunk's C tokens
are N. Per chunk, with W0 (and S0, Titans) the chunk-start state rounded to the compute dtype:

    Y = W0 K^T,  E = dl/dy (2 (Y - V^T), or -V^T for the dot loss)          [d, C]
    cumulative read:  O = a (W0 Q^T) + b (S0 Q^T) + E (R * (K Q^T))         R: [j, t] weights
    chunk-start read: O = W0 Q^T
    W1 = p W0 + q S0 + (c E) K,   S1 = r S0 + (s E) K                       (per-token c, s)

The [C, C] score matrix K Q^T is the one product whose M is C: its keys sit in the first C rows
of a 64-row buffer whose other rows stay zero, so the padded rows of the product are zero. The
float32 state lives in shared memory between chunks, beside its compute-dtype copy that the
wgmmas read; each chunk's inputs are fetched by TMA while the previous chunk computes (two
slots). Every operand is rounded where `chunk_memory._chunk_step` rounds it ("features"), so the
kernel and the jnp reference agree to accumulation order.

Backward: `chunk_memory` wraps this forward in the row kernel's `custom_vjp`; the fused backward
re-runs this forward per checkpoint group (saving every chunk-start state) and walks the group
with the Mosaic GPU reverse walk (kernels/chunk_rows_mgpu_reverse.py, the adjoint written out)
where it fits in shared memory, else with the Pallas reverse kernel (Triton on the GPU); "xla"
recomputes with the jnp reference.

Selected by `KernelBlocks(row_lowering="mosaic_gpu")`; `unsupported_reason` says when it cannot
run an op, which then runs on the Pallas row kernel (`chunk_memory.rows_blocks`, the reason
logged once), or on XLA where that kernel cannot run it either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tnt_jax.kernels.chunk_start_mgpu import (SMEM_BYTES, _interpret_params, _plgpu, _smem,
                                              _store, hopper_reason, operand_reason)

CHUNKS = (16, 32, 64)      # tokens per chunk (after chunk_memory.kernel_chunk's padding): N of
                           # most wgmmas, K of the update's; 64 rows hold the padded scores
SCORE_ROWS = 64            # the score matrix's M (one warpgroup)
# Rows of the packed per-chunk coefficients [8, C] (features layout: per-token rows; the
# chunk-end scalars broadcast along the row).
ROW_READ_W0, ROW_READ_S0, ROW_END_X, ROW_END_SX, ROW_END_W0, ROW_END_S0, ROW_END_SS0 = range(7)
COEF_ROWS = 8


def smem_bytes(head_dim: int, chunk: int, momentum: bool) -> int:
  """Shared memory of one program: the state (float32 + compute-dtype copy), two slots of chunk
  inputs, and the staging buffers."""
  states = 2 if momentum else 1
  state = states * head_dim * head_dim * (4 + 2)
  inputs = 2 * (3 * head_dim * chunk * 2 + SCORE_ROWS * head_dim * 2 + COEF_ROWS * chunk * 4
                + SCORE_ROWS * chunk * 4)
  staging = (2 + states) * head_dim * chunk * 2 + SCORE_ROWS * chunk * 2
  return state + inputs + staging


def unsupported_reason(config, head_dim: int, dtype, chunk: int, *, compiled: bool) -> str | None:
  """Why this kernel cannot run the forward of this op (None when it can). chunk: the kernel's
  (padded) chunk; compiled: on a GPU rather than the interpreter. A 2-layer mlp memory runs on
  kernels/chunk_rows_mgpu_mlp.py."""
  if config.model.kind == "mlp":
    from tnt_jax.kernels import chunk_rows_mgpu_mlp   # it imports this module
    return chunk_rows_mgpu_mlp.unsupported_reason(config, head_dim, dtype, chunk,
                                                  compiled=compiled)
  return linear_kernel_reason("row kernel", smem_bytes, config, head_dim, dtype, chunk,
                              compiled=compiled)


def linear_kernel_reason(kernel: str, smem_fn, config, head_dim: int, dtype, chunk: int, *,
                         compiled: bool) -> str | None:
  """The checks shared by the Mosaic GPU row kernels (this forward and its reverse walk):
  linear model, operands, chunk size, smem_fn(head_dim, chunk, momentum) bytes, platform."""
  model = config.model
  if model.kind != "linear":
    return (f"memory model kind={model.kind!r} (the Mosaic GPU {kernel} does linear memories"
            f"{' and 2-layer mlps' if kernel == 'row kernel' else ''}; the others run on the "
            "Pallas row kernel)")
  if (reason := operand_reason(kernel, head_dim, dtype)) is not None:
    return reason
  if chunk not in CHUNKS:
    return (f"chunk={chunk} (padded from {config.chunk_size}): the Mosaic GPU {kernel} takes "
            f"chunks of {CHUNKS} tokens")
  if (need := smem_fn(head_dim, chunk, config.rule.has_momentum)) > SMEM_BYTES:
    return (f"shared memory {need} bytes at head_dim={head_dim}, chunk={chunk} > {SMEM_BYTES} "
            f"for the {kernel}")
  return hopper_reason(kernel) if compiled else None


def mms(products, during=None):
  """[sum(a @ b for a, b in pairs) for (pairs, shape) in products]: every wgmma issued back to
  back, each sum into its own zeroed float32 accumulator, then one wait. during(): work that
  runs while the wgmmas do (it must neither read their results nor write their operands), so
  it leaves the chunk's chain of dependent steps."""
  plgpu = _plgpu()

  def run(*accs):
    for acc, (pairs, _) in zip(accs, products):
      for a, b in pairs:
        plgpu.wgmma(acc, a, b)
    if during is not None:
      during()
    plgpu.wgmma_wait(0)
    return [acc[...] for acc in accs]

  return pl.run_scoped(run, *[plgpu.ACC(shape, jnp.float32) for _, shape in products])


def pack_coefficients(coefs: dict, rows: int, num_chunks: int, chunk: int):
  """The row kernel's per-chunk coefficients ("features" layout, chunk_memory.ChunkCoefs fields)
  as one float32 [R, N, 8, C] array (rows ROW_*; absent momentum terms are zero) and the read's
  score weights [R, N, C, C] ([j, t]; None for a chunk-start read)."""
  shape = (rows, num_chunks, 1, chunk)
  zero = jnp.zeros(shape, jnp.float32)
  row = lambda name: zero if coefs.get(name) is None else jnp.broadcast_to(
      coefs[name].astype(jnp.float32), shape)
  names = ("read_w0", "read_s0", "end_x", "end_sx", "end_w0", "end_s0", "end_ss0")
  packed = jnp.concatenate([row(n) for n in names] + [zero], axis=2)
  read_x = coefs.get("read_x")
  return packed, None if read_x is None else read_x.astype(jnp.float32)


def linear_rows_forward(qt, kt, vt, packed, read_x, state, *, l2: bool, save_every: int | None,
                        interpret):
  """The forward over every row's chunks.

  qt, kt, vt: [R, N, d, C] compute dtype (features layout); packed [R, N, 8, C] and read_x
  [R, N, C, C] float32 or None (pack_coefficients); state: [W] or [W, S], [R, d, d] float32.
  Returns (out [R, N, d, C] compute dtype, final [W] / [W, S], saved: the start states of chunks
  0, s, 2s, ... ([R, ceil(N / s), d, d] each) for save_every=s, [] for None)."""
  plgpu = _plgpu()
  rows, num_chunks, d, chunk = qt.shape
  cd = qt.dtype
  momentum = len(state) == 2
  cumulative = read_x is not None
  keys = jnp.swapaxes(kt, 2, 3)                            # [R, N, C, d]: the update's B operand
  n_states = len(state)
  n_saved = 0 if save_every is None else -(-num_chunks // save_every)
  inputs = [qt, kt, vt, keys, packed] + ([read_x] if cumulative else [])
  n_loads = len(inputs)

  def body(*refs):
    ins, refs = refs[:n_loads], refs[n_loads:]
    state_g, refs = refs[:n_states], refs[n_states:]
    out_g, refs = refs[0], refs[1:]
    final_g, refs = refs[:n_states], refs[n_states:]
    saved_g, refs = (refs[:n_states], refs[n_states:]) if n_saved else ((), refs)
    (state32, state_cd, qt_s, kt_s, vt_s, keys_s, coef_s, rx_s, e_s, upd_s, p_s, o_s,
     barrier) = refs
    r = lax.axis_index("rows")
    slots = [qt_s, kt_s, vt_s, keys_s, coef_s] + ([rx_s] if cumulative else [])

    def fetch(n, slot):
      for i, (src, dst) in enumerate(zip(ins, slots)):
        dst = dst.at[slot]
        if src is ins[3] or (cumulative and src is ins[5]):
          dst = dst.at[:chunk]                             # rows past C stay zero
        plgpu.copy_gmem_to_smem(src.at[r, n], dst, barrier.at[slot * n_loads + i])

    # The padded rows of the keys and score weights are zero for the whole program.
    for slot in range(2):
      keys_s[slot] = jnp.zeros((SCORE_ROWS, d), cd)
      if cumulative:
        rx_s[slot] = jnp.zeros((SCORE_ROWS, chunk), jnp.float32)
    for i in range(n_states):
      plgpu.copy_gmem_to_smem(state_g[i].at[r], state32.at[i], barrier.at[2 * n_loads + i])
    for i in range(n_states):
      plgpu.barrier_wait(barrier.at[2 * n_loads + i])
      state_cd[i] = state32[i].astype(cd)
    plgpu.commit_smem()
    fetch(0, 0)

    def row_of(slot, index):
      return lax.broadcast_in_dim(coef_s[slot, index], (d, chunk), (1,))

    def scalar_of(slot, index):
      return coef_s[slot, index, 0]

    @pl.loop(0, num_chunks)
    def _(n):
      slot = lax.rem(n, 2)
      for i in range(n_loads):
        plgpu.barrier_wait(barrier.at[slot * n_loads + i])

      @pl.when(n + 1 < num_chunks)
      def _():
        fetch(n + 1, 1 - slot)

      if n_saved:
        @pl.when(lax.rem(n, save_every) == 0)
        def _():
          for i in range(n_states):
            plgpu.copy_smem_to_gmem(state32.at[i], saved_g[i].at[r, n // save_every])

      # The products of the chunk-start state and the inputs, issued back to back.
      qt_c = qt_s.at[slot]
      products = [([(state_cd.at[0], kt_s.at[slot])], (d, chunk)),
                  ([(state_cd.at[0], qt_c)], (d, chunk))]
      if cumulative:
        products.append(([(keys_s.at[slot], qt_c)], (SCORE_ROWS, chunk)))
        if momentum:
          products.append(([(state_cd.at[1], qt_c)], (d, chunk)))
      y, read, *rest = mms(products)
      v = vt_s[slot].astype(jnp.float32)
      e = 2.0 * (y - v) if l2 else -v
      if cumulative:
        out = row_of(slot, ROW_READ_W0) * read
        if momentum:
          out = out + row_of(slot, ROW_READ_S0) * rest[1]
        p_s[...] = (rx_s[slot] * rest[0]).astype(cd)
        e_s[...] = e.astype(cd)
      else:
        out = read
      # The update's outer products on the token-major keys (K = C), with the read's mix.
      upd_s[0] = (row_of(slot, ROW_END_X) * e).astype(cd)
      if momentum:
        upd_s[1] = (row_of(slot, ROW_END_SX) * e).astype(cd)
      plgpu.commit_smem()
      key_rows = keys_s.at[slot].at[:chunk]
      products = [([(upd_s.at[i], key_rows)], (d, d)) for i in range(n_states)]
      if cumulative:
        products.append(([(e_s, p_s.at[:chunk])], (d, chunk)))
      sums = mms(products)
      if cumulative:
        out = out + sums[-1]
      # Its wait for earlier copies from shared memory covers this chunk's saved state too.
      _store(out, o_s, out_g.at[r, n])
      new_w = scalar_of(slot, ROW_END_W0) * state32[0] + sums[0]
      if momentum:
        s_old = state32[1]
        new_w = new_w + scalar_of(slot, ROW_END_S0) * s_old
        new_s = scalar_of(slot, ROW_END_SS0) * s_old + sums[1]
      state32[0] = new_w
      state_cd[0] = new_w.astype(cd)
      if momentum:
        state32[1] = new_s
        state_cd[1] = new_s.astype(cd)
      plgpu.commit_smem()

    for i in range(n_states):
      plgpu.copy_smem_to_gmem(state32.at[i], final_g[i].at[r])
    plgpu.wait_smem_to_gmem(0)

  f32 = jnp.float32
  out_types = [jax.ShapeDtypeStruct(qt.shape, cd)]
  out_types += [jax.ShapeDtypeStruct((rows, d, d), f32)] * n_states
  out_types += [jax.ShapeDtypeStruct((rows, n_saved, d, d), f32)] * (n_states if n_saved else 0)
  # A wgmma's two shared-memory operands share one tiling: every operand buffer takes the
  # swizzle of a C-token row (32 bytes at C = 16).
  swizzle = plgpu.find_swizzle(chunk * jnp.dtype(cd).itemsize * 8)
  operand = lambda shape: _smem(shape, cd, swizzle)
  scratch = [
      _smem((n_states, d, d), f32), operand((n_states, d, d)),
      operand((2, d, chunk)), operand((2, d, chunk)), operand((2, d, chunk)),
      operand((2, SCORE_ROWS, d)), plgpu.SMEM((2, COEF_ROWS, chunk), f32),
      plgpu.SMEM((2, SCORE_ROWS, chunk), f32), operand((d, chunk)),
      operand((n_states, d, chunk)), operand((SCORE_ROWS, chunk)), operand((d, chunk)),
      plgpu.Barrier(num_barriers=2 * n_loads + n_states)]
  results = plgpu.kernel(
      body, out_type=out_types, scratch_types=scratch, grid=(rows,), grid_names=("rows",),
      interpret=_interpret_params(interpret),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup))(*inputs, *state)
  out, final = results[0], list(results[1:1 + n_states])
  saved = list(results[1 + n_states:]) if n_saved else []
  return out, final, saved
