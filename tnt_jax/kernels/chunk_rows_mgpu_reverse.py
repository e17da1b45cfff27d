"""Mosaic GPU (Hopper wgmma) reverse walk of the row kernel for a linear memory: the hand-written
adjoint of `chunk_rows_mgpu`'s chunk step.

One warpgroup per (batch, head) row walks the row's chunks last to first, carrying the state's
cotangent (dW, and dS for Titans) in shared memory, and emits every input's gradient. Chunk n
starts from its saved chunk-start state W0 (S0), which the fused backward's per-group re-run of
the forward saved (chunk_memory._rows_backward_grouped). The forward (features layout, [d, C]
activations, per-token coefficient rows; see chunk_rows_mgpu):

    E = 2 (W0 K - V)  (l2)  or  -V  (dot)
    O = a (W0 Q) + b (S0 Q) + E P,   P = X * (K^T Q)    [j, t]      (chunk-start read: O = W0 Q)
    W1 = p W0 + q S0 + (c E) K^T,    S1 = r S0 + (s E) K^T

and its adjoint, given dO, dW1, dS1 (G = a dO, H = b dO; chunk-start: G = dO, H = 0):

    dU = dW1 K,  dUs = dS1 K          dE = c dU + s dUs + dO P^T      dY = 2 dE (l2; 0 for dot)
    dP^T = dO^T E  (token-major dO),  dA^T = X^T * dP^T,  dX^T = (K^T Q)^T * dP^T
    dQ = W0^T G + S0^T H + K dA       dK = W0^T dY + dW1^T (c E) + dS1^T (s E) + Q dA^T
    dV = -dY (l2) or -dE (dot)
    dW0 = p dW1 + G Q^T + dY K^T      dS0 = q dW1 + r dS1 + H Q^T
    da = sum_i dO * (W0 Q),  db = sum_i dO * (S0 Q),  dc = sum_i dU * E,  ds = sum_i dUs * E
    dp = <dW1, W0>,  dq = <dW1, S0>,  dr = <dS1, S0>

Every product is a wgmma whose M is d (one warpgroup of 64 rows) or the 64-row zero-padded token
axis (dP^T, K^T Q). Products with a transposed state operand (W0^T, dW1^T) read the shared buffer
through `plgpu.transpose_ref` (wgmma's transposed-operand mode); the interpreter has no
transposed refs, so there the kernel writes the transpose into a spare buffer instead (the one
difference between the compiled and the interpreted kernel). Per chunk the inputs (q, k, v, dO in
both layouts, coefficients, score weights) arrive by TMA one chunk ahead (two slots); the saved
state has one buffer, refilled for the next chunk as soon as this chunk has rounded it.

The coefficient gradients are reductions (over d for the per-token ones, over d x d for the
chunk-end scalars'). They leave the kernel: it writes the elementwise products (dU * E, dUs * E,
dO * (W0 Q), dO * (S0 Q), [d, C] float32 each) and the cotangent dW1 (dS1) it carries into each
chunk, and `coefficient_grads` sums them in XLA (against the saved W0, S0). A reduction inside
the kernel crosses the warpgroup's four warps through shared memory with a barrier: the first
version did seven a chunk on the serial path (notes v13).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tnt_jax.kernels.chunk_rows_mgpu import (CHUNKS, COEF_ROWS, ROW_END_S0, ROW_END_SS0,
                                             ROW_END_SX, ROW_END_W0, ROW_END_X, ROW_READ_S0,
                                             ROW_READ_W0, SCORE_ROWS, linear_kernel_reason,
                                             mms)
from tnt_jax.kernels.chunk_start_mgpu import _interpret_params, _plgpu, _smem



def smem_bytes(head_dim: int, chunk: int, momentum: bool) -> int:
  """Shared memory of one compiled program: two slots of chunk inputs, the saved state (float32 +
  compute-dtype copy), the carried cotangent (the same), and the staging buffers."""
  d, states = head_dim, 2 if momentum else 1
  features = 4 * d * chunk * 2                              # qt, kt, vt, dO^T
  tokens = 2 * SCORE_ROWS * d * 2 + chunk * d * 2           # q, dO (64 padded rows), k
  coefs = COEF_ROWS * chunk * 4 + SCORE_ROWS * chunk * 4
  slots = 2 * (features + tokens + coefs)
  state = 2 * states * d * d * (4 + 2)                      # W0 (S0) and dW (dS)
  staging = (6 * d * chunk + 2 * SCORE_ROWS * chunk) * 2 + 3 * d * chunk * 2
  staging += 4 * d * chunk * 4 + SCORE_ROWS * chunk * 4     # the products, dX^T
  return slots + state + staging


def unsupported_reason(config, head_dim: int, dtype, chunk: int, *, compiled: bool) -> str | None:
  """Why this reverse kernel cannot run the backward of this op (None when it can)."""
  return linear_kernel_reason("reverse row kernel", smem_bytes, config, head_dim, dtype, chunk,
                              compiled=compiled)


def product_fields(momentum: bool, cumulative: bool) -> tuple:
  """The coefficient fields whose per-token gradient is a sum over d of a product the kernel
  writes, in the order it writes them."""
  fields = ("end_x",) + (("end_sx",) if momentum else ())
  if cumulative:
    fields += ("read_w0",) + (("read_s0",) if momentum else ())
  return fields


def end_dots(d_ends, saved) -> dict:
  """The chunk-end scalars' gradients [R, N, 1, 1] from the cotangent carried into each
  chunk's end d_ends and the saved chunk-start states ([W] / [W, S], [R, N, d, d])."""
  dot = lambda a, b: jnp.sum(a * b, axis=(2, 3))[..., None, None]
  dots = {"end_w0": dot(d_ends[0], saved[0])}
  if len(saved) == 2:
    dots["end_s0"] = dot(d_ends[0], saved[1])
    dots["end_ss0"] = dot(d_ends[1], saved[1])
  return dots


def coefficient_grads(products, end_grads: dict, d_read_x, coefs: dict) -> dict:
  """Every coefficient's gradient (shaped as the coefficient, features layout) from the kernel's
  products [R, N, P, rows, C] (P: product_fields), the chunk-end scalars' gradients end_grads
  (`end_dots`; [R, N, 1, 1] each, their names saying whether the rule has momentum) and dX."""
  sums = jnp.sum(products, axis=3)                             # [R, N, P, C]
  fields = product_fields("end_s0" in end_grads, d_read_x is not None)
  grads = {name: sums[:, :, i:i + 1] for i, name in enumerate(fields)}
  grads.update(end_grads)
  if d_read_x is not None:
    grads["read_x"] = d_read_x
  return {name: grads[name].reshape(coefs[name].shape).astype(coefs[name].dtype)
          for name in coefs}


def linear_rows_reverse(qt, kt, vt, packed, read_x, saved, d_out, d_final, *, l2: bool,
                        interpret):
  """The reverse walk over every row's chunks.

  qt, kt, vt, d_out: [R, N, d, C] compute dtype (features layout); packed [R, N, 8, C] and
  read_x [R, N, C, C] ([j, t]) float32 or None (chunk_rows_mgpu.pack_coefficients); saved: the
  start state of every chunk, [W] or [W, S] as [R, N, d, d] float32; d_final: the final state's
  cotangent, [R, d, d] float32 each. Returns (dqt, dkt, dvt [R, N, d, C] compute dtype,
  products [R, N, P, d, C] float32 (product_fields), d_read_x [R, N, C, C] or None, d_ends
  (the cotangent carried into each chunk's end, [R, N, d, d] per state), d_init [W] / [W, S]);
  `coefficient_grads` turns them into the coefficients' gradients."""
  plgpu = _plgpu()
  rows, num_chunks, d, chunk = qt.shape
  cd = qt.dtype
  momentum = len(saved) == 2
  cumulative = read_x is not None
  n_states = len(saved)
  f32 = jnp.float32
  tokens = lambda x: jnp.swapaxes(x, 2, 3)                  # [R, N, C, d]
  d_out = d_out.astype(cd)
  inputs = [qt, kt, vt, d_out, tokens(qt), tokens(kt), tokens(d_out), packed]
  if cumulative:
    inputs.append(jnp.swapaxes(read_x, 2, 3))               # X^T [t, j]
  n_loads = len(inputs)
  n_products = len(product_fields(momentum, cumulative))
  padded = (4, 6, 8)                                        # loads into 64-row zeroed buffers

  def body(*refs):
    ins, refs = refs[:n_loads], refs[n_loads:]
    saved_g, refs = refs[:n_states], refs[n_states:]
    d_final_g, refs = refs[:n_states], refs[n_states:]
    (dq_g, dk_g, dv_g, prod_g), refs = refs[:4], refs[4:]
    drx_g, refs = (refs[0], refs[1:]) if cumulative else (None, refs)
    d_end_g, refs = refs[:n_states], refs[n_states:]
    d_init_g, refs = refs[:n_states], refs[n_states:]
    (slot_refs, refs) = refs[:n_loads], refs[n_loads:]
    (st32, stc, dst32, dstc, e_s, pt_s, g_s, h_s, dy_s, u_s, dat_s, dq_s, dk_s, dv_s, prod_s,
     drx_s, barrier), spares = refs[:17], refs[17:]
    r = lax.axis_index("rows")
    state_barrier = 2 * n_loads               # one per state, then one per cotangent
    init_barrier = state_barrier + n_states

    def transposed(ref, spare):
      """ref^T as a wgmma operand: a transposed view when compiled, a written copy when not."""
      if not interpret:
        return plgpu.transpose_ref(ref, (1, 0))
      spare = spares[spare]
      spare[...] = ref[...].T
      return spare

    def fetch(n, slot):
      for i, (src, dst) in enumerate(zip(ins, slot_refs)):
        dst = dst.at[slot]
        if i in padded:
          dst = dst.at[:chunk]                             # rows past C stay zero
        plgpu.copy_gmem_to_smem(src.at[r, n], dst, barrier.at[slot * n_loads + i])

    def fetch_state(n):
      for i in range(n_states):
        plgpu.copy_gmem_to_smem(saved_g[i].at[r, n], st32.at[i], barrier.at[state_barrier + i])

    for slot in range(2):
      for i in padded:
        if i < n_loads:
          slot_refs[i][slot] = jnp.zeros(slot_refs[i].shape[1:], slot_refs[i].dtype)
    for i in range(n_states):
      plgpu.copy_gmem_to_smem(d_final_g[i].at[r], dst32.at[i], barrier.at[init_barrier + i])
    for i in range(n_states):
      plgpu.barrier_wait(barrier.at[init_barrier + i])
      dstc[i] = dst32[i].astype(cd)
    plgpu.commit_smem()
    fetch(num_chunks - 1, 0)
    fetch_state(num_chunks - 1)

    @pl.loop(0, num_chunks)
    def _(i):
      n = num_chunks - 1 - i
      slot = lax.rem(i, 2)
      qt_s, kt_s, vt_s, do_s, qtok_s, ktok_s, dotok_s, coef_s, *rx = (
          ref.at[slot] for ref in slot_refs)
      for j in range(n_loads):
        plgpu.barrier_wait(barrier.at[slot * n_loads + j])
      for j in range(n_states):
        plgpu.barrier_wait(barrier.at[state_barrier + j])

      # dW1 (dS1) out for the chunk-end scalars' gradients (the update below waits for it).
      for j in range(n_states):
        plgpu.copy_smem_to_gmem(dst32.at[j], d_end_g[j].at[r, n])
        stc[j] = st32[j].astype(cd)
      plgpu.commit_smem()

      @pl.when(i + 1 < num_chunks)
      def _():
        fetch_state(n - 1)
        fetch(n - 1, 1 - slot)

      row_of = lambda index: lax.broadcast_in_dim(coef_s[index], (d, chunk), (1,))
      scalar_of = lambda index: coef_s[index, 0]

      # Round 0: the forward's products at W0 and the carried cotangent's with the keys.
      products = {"du": ([(dstc.at[0], kt_s)], (d, chunk))}
      if momentum:
        products["dus"] = ([(dstc.at[1], kt_s)], (d, chunk))
      if l2:
        products["y"] = ([(stc.at[0], kt_s)], (d, chunk))
      if cumulative:
        products["read"] = ([(stc.at[0], qt_s)], (d, chunk))
        products["at"] = ([(qtok_s, kt_s)], (SCORE_ROWS, chunk))       # (K^T Q)^T  [t, j]
        if momentum:
          products["read_s"] = ([(stc.at[1], qt_s)], (d, chunk))
      got = dict(zip(products, mms(list(products.values()))))
      v = vt_s[...].astype(f32)
      e = 2.0 * (got["y"] - v) if l2 else -v
      d_out_c = do_s[...].astype(f32)
      e_s[...] = e.astype(cd)
      if cumulative:
        x_t = rx[0][...]
        pt_s[...] = (x_t * got["at"]).astype(cd)
      plgpu.commit_smem()

      # Round 1 (cumulative read): dP^T = dO^T E and the read's share of dE, dO P^T.
      d_e = row_of(ROW_END_X) * got["du"]
      if momentum:
        d_e = d_e + row_of(ROW_END_SX) * got["dus"]
      if cumulative:
        d_pt, d_e_mix = mms([([(dotok_s, e_s)], (SCORE_ROWS, chunk)),
                             ([(do_s, pt_s.at[:chunk])], (d, chunk))])
        d_e = d_e + d_e_mix
        dat_s[...] = (x_t * d_pt).astype(cd)
        drx = got["at"] * d_pt
        g = row_of(ROW_READ_W0) * d_out_c
        h = row_of(ROW_READ_S0) * d_out_c if momentum else None
      else:
        g, h = d_out_c, None
      d_y = 2.0 * d_e if l2 else None
      g_s[...] = g.astype(cd)
      if h is not None:
        h_s[...] = h.astype(cd)
      if l2:
        dy_s[...] = d_y.astype(cd)
      u_s[0] = (row_of(ROW_END_X) * e).astype(cd)
      if momentum:
        u_s[1] = (row_of(ROW_END_SX) * e).astype(cd)
      plgpu.commit_smem()

      # Round 2: the inputs' gradients and the state cotangent's new terms.
      w0_t = transposed(stc.at[0], 0)
      dq = [(w0_t, g_s)]
      dk = [(transposed(dstc.at[0], 1), u_s.at[0])]
      dw = [(g_s, qtok_s.at[:chunk])]
      if l2:
        dk.append((w0_t, dy_s))
        dw.append((dy_s, ktok_s))
      if momentum:
        dk.append((transposed(dstc.at[1], 2), u_s.at[1]))
      if cumulative:
        dq.append((kt_s, transposed(dat_s.at[:chunk], 3)))
        dk.append((qt_s, dat_s.at[:chunk]))
      products = [(dq, (d, chunk)), (dk, (d, chunk)), (dw, (d, d))]
      if h is not None:
        dq.append((transposed(stc.at[1], 4), h_s))
        products.append(([(h_s, qtok_s.at[:chunk])], (d, d)))
      d_q, d_k, g_w, *g_s0 = mms(products)
      d_v = -d_y if l2 else -d_e

      # Outputs: wait until the previous chunk's copies have read the staging buffers.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      dq_s[...] = d_q.astype(cd)
      dk_s[...] = d_k.astype(cd)
      dv_s[...] = d_v.astype(cd)
      # The coefficients' products, in product_fields order.
      products = [got["du"] * e] + ([got["dus"] * e] if momentum else [])
      if cumulative:
        products.append(d_out_c * got["read"])
        if momentum:
          products.append(d_out_c * got["read_s"])
        drx_s[...] = drx
      for j, product in enumerate(products):
        prod_s[j] = product

      # The carried cotangent: dW0 = p dW1 + G Q^T + dY K^T;  dS0 = q dW1 + r dS1 + H Q^T.
      dw1 = dst32[0]
      new_dw = scalar_of(ROW_END_W0) * dw1 + g_w
      if momentum:
        new_ds = scalar_of(ROW_END_S0) * dw1 + scalar_of(ROW_END_SS0) * dst32[1]
        if g_s0:
          new_ds = new_ds + g_s0[0]
        dst32[1] = new_ds
        dstc[1] = new_ds.astype(cd)
      dst32[0] = new_dw
      dstc[0] = new_dw.astype(cd)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dq_s, dq_g.at[r, n])
      plgpu.copy_smem_to_gmem(dk_s, dk_g.at[r, n])
      plgpu.copy_smem_to_gmem(dv_s, dv_g.at[r, n])
      plgpu.copy_smem_to_gmem(prod_s, prod_g.at[r, n])
      if cumulative:
        plgpu.copy_smem_to_gmem(drx_s.at[:chunk], drx_g.at[r, n])

    for j in range(n_states):
      plgpu.copy_smem_to_gmem(dst32.at[j], d_init_g[j].at[r])
    plgpu.wait_smem_to_gmem(0)

  feature_type = jax.ShapeDtypeStruct(qt.shape, cd)
  out_types = [feature_type] * 3 + [
      jax.ShapeDtypeStruct((rows, num_chunks, n_products, d, chunk), f32)]
  if cumulative:
    out_types.append(jax.ShapeDtypeStruct((rows, num_chunks, chunk, chunk), f32))
  out_types += [jax.ShapeDtypeStruct((rows, num_chunks, d, d), f32)] * n_states
  out_types += [jax.ShapeDtypeStruct((rows, d, d), f32)] * n_states
  # As in the forward: every wgmma operand buffer takes the swizzle of a C-token row.
  swizzle = plgpu.find_swizzle(chunk * jnp.dtype(cd).itemsize * 8)
  operand = lambda shape: _smem(shape, cd, swizzle)
  slot_types = [operand((2, d, chunk))] * 4 + [
      operand((2, SCORE_ROWS, d)), operand((2, chunk, d)), operand((2, SCORE_ROWS, d)),
      plgpu.SMEM((2, COEF_ROWS, chunk), f32)]
  if cumulative:
    slot_types.append(plgpu.SMEM((2, SCORE_ROWS, chunk), f32))
  scratch = slot_types + [
      _smem((n_states, d, d), f32), operand((n_states, d, d)),         # W0 (S0)
      _smem((n_states, d, d), f32), operand((n_states, d, d)),         # dW (dS)
      operand((d, chunk)), operand((SCORE_ROWS, chunk)),               # E, P^T
      operand((d, chunk)), operand((d, chunk)), operand((d, chunk)),   # G, H, dY
      operand((n_states, d, chunk)), operand((SCORE_ROWS, chunk)),     # c E (s E), dA^T
      operand((d, chunk)), operand((d, chunk)), operand((d, chunk)),   # dq, dk, dv staging
      plgpu.SMEM((n_products, d, chunk), f32), plgpu.SMEM((SCORE_ROWS, chunk), f32),
      plgpu.Barrier(num_barriers=2 * n_loads + 2 * n_states)]
  if interpret:   # transposed copies: W0^T, dW^T, dS^T, dA, S0^T (`transposed`)
    scratch += [operand((d, d))] * 3 + [operand((chunk, chunk)), operand((d, d))]
  results = plgpu.kernel(
      body, out_type=out_types, scratch_types=scratch, grid=(rows,), grid_names=("rows",),
      interpret=_interpret_params(interpret),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup))(*inputs, *saved, *d_final)
  dq, dk, dv, products = results[:4]
  d_read_x = jnp.swapaxes(results[4], 2, 3) if cumulative else None
  rest = results[4 + cumulative:]
  return dq, dk, dv, products, d_read_x, list(rest[:n_states]), list(rest[n_states:])
