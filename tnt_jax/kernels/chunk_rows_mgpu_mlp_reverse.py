"""Mosaic GPU (Hopper wgmma) reverse walk of the row kernel for a 2-layer mlp memory: the
hand-written adjoint of `chunk_rows_mgpu_mlp`'s chunk step, its hidden units split over the same
thread-block cluster.

Each program of a row's cluster holds one slice of 64 hidden units: the chunk-start blocks W1s,
W2s (S1s, S2s) of its slice, in the compute dtype, and the cotangent carried through the walk for
the same blocks (float32 plus a compute-dtype copy for the wgmmas). It walks the row's chunks last
to first. Per chunk it recomputes the slice's forward from the saved blocks and the chunk's E (the
loss gradient, which the fused backward's per-group re-run of the forward saved, so Y is not
summed again), then runs the adjoint (the forward's notation: a, b the read's, c, s the update's
per-token coefficients, p, q, r its chunk-end scalars; "part" marks a sum over hidden units):

    Z = W1 K, A = act(Z), Bk = W2^T E, D = Bk * act'(Z)          recomputed
    Zq = a (W1 Q) + b (S1 Q) + D P1, Aq = act(Zq)                 (chunk-start read: Zq = W1 Q)
    G = a dO, H = b dO;  dAq = W2^T G + S2^T H + A M2;  dZq = dAq * act'(Zq)
    G1 = a dZq, H1 = b dZq;  dQ = W1^T G1 + S1^T H1 (part)
    dD = c (dW1' K) + s (dS1' K) + dZq P1^T
    dBk = dD * act'(Z);  dE = W2 dBk + c (dW2' A) + s (dS2' A) + dO P2^T  (part: the exchange)
    dY = 2 dE (l2; 0 for the dot loss);  dA = Aq M2^T + dW2'^T (c E) + dS2'^T (s E) + W2^T dY
    dZ = dD * Bk * act''(Z) + dA * act'(Z);  dK = W1^T dZ + dW1'^T (c D) + dS1'^T (s D) (part)
    dW1 = p dW1' + G1 Q^T + dZ K^T,   dS1 = q dW1' + r dS1' + H1 Q^T
    dW2 = p dW2' + G Aq^T + E dBk^T + dY A^T,   dS2 = q dW2' + r dS2' + H Aq^T

Every term is the slice's own but dE, which every program needs whole for dY: its [d, C] float32
parts are exchanged once per chunk as the forward exchanges Y's (`plgpu.async_store_smem` into
every peer, summed in slice order). The cumulative read's [C, C] score terms are left to XLA
around the kernel, where they are one batched matmul each and take no shared memory: P1 =
X * (K^T Q), M2 = X * (E^T dO) and each slice's P2 = X * (A^T Aq) (from the scores the forward
re-run saved) come in; D and dZq go out, and XLA forms dP1 = sum_s D^T dZq, M1 = X * dP1, adds
K M1 to dQ and Q M1^T to dK, and the score weights' gradient. dQ, dK and the coefficients'
elementwise products leave per slice in float32 and XLA sums them (the linear reverse walk's
`coefficient_grads`); the chunk-end scalars' gradients, inner products of the carried cotangent
with the chunk-start blocks, are summed along each block's rows in the kernel.

The interpreter has neither cluster stores nor transposed refs: interpreted, one program per row
walks every slice (the same per-slice code, the parts summed in the same order) and transposes
are written into spare buffers, as in the forward. Two slots of chunk inputs fit wherever the walk
does (the next chunk's arrive while this one computes), but for gd with hidden 256 at C = 32,
which takes one (the next chunk's are fetched after the last product that reads this one's).
The saved blocks of the next chunk are fetched at that point in either case.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tnt_jax.kernels import mgpu_launch
from tnt_jax.kernels.chunk_rows_mgpu import (COEF_ROWS, ROW_END_S0, ROW_END_SS0,
                                             ROW_END_SX, ROW_END_W0, ROW_END_X, ROW_READ_S0,
                                             ROW_READ_W0, mms, pack_coefficients)
from tnt_jax.kernels.chunk_rows_mgpu_mlp import (UNITS, cluster_sum, exchange_bytes,
                                                 exchange_types, slice_block)
from tnt_jax.kernels.chunk_rows_mgpu_mlp import smem_bytes as forward_smem_bytes
from tnt_jax.kernels.chunk_rows_mgpu_mlp import unsupported_reason as forward_reason
from tnt_jax.kernels.chunk_rows_mgpu_reverse import coefficient_grads, product_fields
from tnt_jax.kernels.chunk_start_mgpu import SMEM_BYTES, _plgpu, _smem
from tnt_jax.kernels.step_math import act_grad_and_curvature

PRODUCT_ROWS = 64     # the coefficient products' rows (hidden units and features, both 64)


def smem_bytes(head_dim: int, chunk: int, momentum: bool, slices: int, input_slots: int) -> int:
  """Shared memory of one compiled program (one slice)."""
  d, u, blocks, n_upd = head_dim, UNITS, 4 if momentum else 2, 2 if momentum else 1
  tile = lambda rows: rows * chunk * 2                       # a [rows, C] compute-dtype buffer
  inputs = 4 * tile(d) + COEF_ROWS * chunk * 4 + 3 * chunk * chunk * 2   # q, k, dO, E; P1 M2 P2
  state = blocks * u * d * 2 + blocks * u * d * (4 + 2)      # saved; carried (float32 + copy)
  staging = (6 + n_upd) * tile(u) + (n_upd + 1) * tile(d)
  outputs = 2 * d * chunk * 4 + 2 * n_upd * PRODUCT_ROWS * chunk * 4 + 3 * PRODUCT_ROWS * 4
  exchange = exchange_bytes(slices, d, chunk)                 # the peers' parts of dE
  return input_slots * inputs + state + staging + outputs + exchange + 2048   # + barriers


def input_slots(head_dim: int, chunk: int, momentum: bool, slices: int) -> int:
  """Two slots of chunk inputs where they fit (the next chunk's arrive during this one), else
  one (0 where even that does not fit)."""
  for slots in (2, 1):
    if smem_bytes(head_dim, chunk, momentum, slices, slots) <= SMEM_BYTES:
      return slots
  return 0


def unsupported_reason(config, head_dim: int, dtype, chunk: int, *, compiled: bool) -> str | None:
  """Why this reverse walk cannot run the backward of this op (None when it can): the op must
  run on the Mosaic GPU mlp forward (it re-runs it per checkpoint group) and fit in shared
  memory."""
  if (reason := forward_reason(config, head_dim, dtype, chunk, compiled=compiled)) is not None:
    return reason
  slices = config.model.hidden_dim(head_dim) // UNITS
  momentum = config.rule.has_momentum
  # The group re-runs of the forward stage the read's scores for this walk.
  if (need := forward_smem_bytes(head_dim, chunk, momentum, slices,
                                 aux=config.read == "cumulative")) > SMEM_BYTES:
    return (f"shared memory {need} bytes at head_dim={head_dim}, hidden {slices * UNITS}, "
            f"chunk={chunk} > {SMEM_BYTES} for the mlp row kernel saving for the reverse walk")
  if not input_slots(head_dim, chunk, momentum, slices):
    need = smem_bytes(head_dim, chunk, momentum, slices, 1)
    return (f"shared memory {need} bytes at head_dim={head_dim}, hidden {slices * UNITS}, "
            f"chunk={chunk} > {SMEM_BYTES} for the mlp reverse walk")
  return None


def mlp_rows_reverse(qt, kt, d_out, e, packed, p1, m2, p2, saved, d_final, *, activation: str,
                     l2: bool, interpret, beside=()):
  """The reverse walk over every row's chunks (`mlp_reverse_part`), in one launch with the
  `mgpu_launch.KernelPart`s `beside` on rows of their own; returns the walk's results, then
  each beside part's raw results."""
  part, finish = mlp_reverse_part(qt, kt, d_out, e, packed, p1, m2, p2, saved, d_final,
                                  activation=activation, l2=l2, interpret=interpret)
  results, *others = mgpu_launch.launch([part, *beside], interpret=interpret)
  return finish(results), others


def mlp_reverse_part(qt, kt, d_out, e, packed, p1, m2, p2, saved, d_final, *, activation: str,
                     l2: bool, interpret):
  """The reverse walk over every row's chunks as a `mgpu_launch.KernelPart`, with the function
  that turns its results into those listed here.

  qt, kt, d_out, e: [R, N, d, C] compute dtype (features layout; e is the loss gradient E);
  packed [R, N, 8, C] float32 (chunk_rows_mgpu.pack_coefficients); p1, m2 [R, N, C, C] and p2
  [R, N, slices, C, C] compute dtype ([j, t]), or None for the chunk-start read; saved: the start
  state of every chunk in the compute dtype, [W1, W2] or [W1, W2, S1, S2] ([R, N, h, d],
  [R, N, d, h]); d_final: the final state's cotangent, float32 [R, h, d] / [R, d, h].

  Returns (dq, dk: [R, slices, N, d, C] float32 parts; dy [R, N, d, C] compute dtype (2 dE, or
  dE for the dot loss; dV = -dy); products [R, slices, N, P, 64, C] float32 (product_fields);
  dc, dzq: D and dZq [R, slices, N, 64, C] compute dtype, or None for the chunk-start read;
  ends [R, slices, N, 3 (1 for gd), 64] float32: the chunk-end scalars' inner products (p, q,
  r) summed along each block's rows; d_init)."""
  plgpu = _plgpu()
  rows, num_chunks, d, chunk = qt.shape
  cd, f32 = qt.dtype, jnp.float32
  n_states = len(saved)
  momentum = n_states == 4
  n_upd = 2 if momentum else 1
  n_slices = saved[0].shape[2] // UNITS
  cluster = 1 if interpret else n_slices         # programs per row
  local = n_slices // cluster                   # slices per program
  exchange = cluster > 1
  cumulative = p1 is not None
  slots = input_slots(d, chunk, momentum, n_slices)
  fields = product_fields(momentum, cumulative)
  n_products = len(fields)
  u = UNITS
  w1, w2, s1, s2 = 0, 1, 2, 3
  shared_inputs = [qt, kt, d_out.astype(cd), e, packed] + ([p1, m2] if cumulative else [])
  n_shared = len(shared_inputs)
  n_loads = n_shared + (local if cumulative else 0)          # + each slice's P2
  act = lambda z: act_grad_and_curvature(activation, z)
  spare_shapes = {"w1t": (d, u), "s1t": (d, u), "w2t": (u, d), "s2t": (u, d), "dw1t": (d, u),
                  "ds1t": (d, u), "dw2t": (u, d), "ds2t": (u, d), "p1t": (chunk, chunk),
                  "m2t": (chunk, chunk), "p2t": (chunk, chunk), "qtt": (chunk, d),
                  "ktt": (chunk, d), "aqt": (chunk, u), "dbkt": (chunk, u), "at": (chunk, u)}

  def body(r, *refs):
    ins, refs = refs[:n_shared], refs[n_shared:]
    p2_g, refs = (refs[0], refs[1:]) if cumulative else (None, refs)
    saved_g, refs = refs[:n_states], refs[n_states:]
    d_final_g, refs = refs[:n_states], refs[n_states:]
    (dq_g, dk_g, dy_g, prod_g), refs = refs[:4], refs[4:]
    (dc_g, dzq_g), refs = (refs[:2], refs[2:]) if cumulative else ((None, None), refs)
    ends_g, refs = refs[0], refs[1:]
    d_init_g, refs = refs[:n_states], refs[n_states:]
    slot_refs, refs = refs[:n_shared], refs[n_shared:]
    p2_s, refs = (refs[0], refs[1:]) if cumulative else (None, refs)
    (st, dst32, dstc, a_s, dc_s, aq_s, dzq_s, g1_s, dbk_s, dz_s, g_s, dy_s, dq_s, dk_s, prod_s,
     ends_s, xsum_s, barrier, xbar), spare_refs = refs[:19], refs[19:]
    spares = dict(zip(spare_shapes, spare_refs))
    c = lax.axis_index("slices") if exchange else 0
    state_barrier = slots * n_loads
    init_barrier = state_barrier + n_states * local

    def transposed(ref, key):
      """ref^T as a wgmma operand: a transposed view when compiled, a written copy when not."""
      if not interpret:
        return plgpu.transpose_ref(ref, (1, 0))
      spares[key][...] = ref[...].T
      return spares[key]

    def fetch(n, slot):
      for i, (src, dst) in enumerate(zip(shared_inputs, slot_refs)):
        plgpu.copy_gmem_to_smem(ins[i].at[r, n], dst.at[slot], barrier.at[slot * n_loads + i])
      if cumulative:
        for l in range(local):
          plgpu.copy_gmem_to_smem(p2_g.at[r, n, c * local + l], p2_s.at[slot, l],
                                  barrier.at[slot * n_loads + n_shared + l])

    def fetch_state(n):
      for i in range(n_states):
        for l in range(local):
          plgpu.copy_gmem_to_smem(slice_block(saved_g[i].at[r, n], i, c * local + l),
                                  st.at[i, l], barrier.at[state_barrier + i * local + l])

    for i in range(n_states):
      for l in range(local):
        plgpu.copy_gmem_to_smem(slice_block(d_final_g[i].at[r], i, c * local + l),
                                dst32.at[i, l], barrier.at[init_barrier + i * local + l])
    for i in range(n_states):
      for l in range(local):
        plgpu.barrier_wait(barrier.at[init_barrier + i * local + l])
        dstc[i, l] = dst32[i, l].astype(cd)
    plgpu.commit_smem()
    fetch(num_chunks - 1, 0)
    fetch_state(num_chunks - 1)

    @pl.loop(0, num_chunks)
    def _(i):
      n = num_chunks - 1 - i
      slot = lax.rem(i, 2) if slots == 2 else 0
      qt_c, kt_c, do_c, e_c, coef, *pm = (ref.at[slot] for ref in slot_refs)
      p1_c, m2_c = pm if cumulative else (None, None)
      for j in range(n_loads):
        plgpu.barrier_wait(barrier.at[slot * n_loads + j])
      for j in range(n_states * local):
        plgpu.barrier_wait(barrier.at[state_barrier + j])
      if slots == 2:
        @pl.when(i + 1 < num_chunks)
        def _():
          fetch(n - 1, 1 - slot)

      row_of = lambda index, width: lax.broadcast_in_dim(coef[index], (width, chunk), (1,))
      e32 = e_c[...].astype(f32)
      do32 = do_c[...].astype(f32)
      g_op = g_s.at[0] if cumulative else do_c          # G = a dO (chunk-start read: dO)

      # Phase A, per slice: the forward recomputed, then the adjoint up to this slice's dE part.
      kept, parts = [], []
      for l in range(local):
        W1, W2 = st.at[w1, l], st.at[w2, l]
        S1, S2 = (st.at[s1, l], st.at[s2, l]) if momentum else (None, None)
        # Round 1: the keys' layer 1, the pulled-back E, the read's layer 1 at W1 (S1), and the
        # carried layer-1 cotangents against the keys.
        products = {"z": ([(W1, kt_c)], (u, chunk)), "zw": ([(W1, qt_c)], (u, chunk)),
                    "bk": ([(transposed(W2, "w2t"), e_c)], (u, chunk)),
                    "u1": ([(dstc.at[w1, l], kt_c)], (u, chunk))}
        if momentum:
          products["us1"] = ([(dstc.at[s1, l], kt_c)], (u, chunk))
          if cumulative:
            products["zs"] = ([(S1, qt_c)], (u, chunk))
        got = dict(zip(products, mms(list(products.values()))))
        a, da, dda = act(got["z"])
        delta = got["bk"] * da
        if l == 0:
          # The last chunk's outputs were copied from these staging buffers: wait for the reads.
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          if cumulative:
            g_s[0] = (row_of(ROW_READ_W0, d) * do32).astype(cd)
            if momentum:
              g_s[1] = (row_of(ROW_READ_S0, d) * do32).astype(cd)
        a_s[l] = a.astype(cd)
        dc_s[l] = delta.astype(cd)
        plgpu.commit_smem()

        # Round 2: the read's layer-1 mix; the carried layer-2 cotangents against A; the update's
        # transposed terms of dK and dA: dW1'^T (c D) = c (dW1'^T D) and dW2'^T (c E) =
        # c (dW2'^T E), the per-token coefficients applied after the product (no staging).
        products = {"u2": ([(dstc.at[w2, l], a_s.at[l])], (d, chunk)),
                    "dk_w": ([(transposed(dstc.at[w1, l], "dw1t"), dc_s.at[l])], (d, chunk)),
                    "da_w": ([(transposed(dstc.at[w2, l], "dw2t"), e_c)], (u, chunk))}
        if momentum:
          products["us2"] = ([(dstc.at[s2, l], a_s.at[l])], (d, chunk))
          products["dk_s"] = ([(transposed(dstc.at[s1, l], "ds1t"), dc_s.at[l])], (d, chunk))
          products["da_s"] = ([(transposed(dstc.at[s2, l], "ds2t"), e_c)], (u, chunk))
        if cumulative:
          products["dp1"] = ([(dc_s.at[l], p1_c)], (u, chunk))

        def ends(l=l):
          """The chunk-end scalars' gradients: inner products of the cotangent carried into
          this chunk's end with the chunk-start blocks (p: <dW', W>, q: <dW', S>, r: <dS', S>,
          both layers), summed along each block's rows here and over rows and slices in XLA.
          They read only blocks no wgmma of this round writes, so they run beside them."""
          inner = lambda pairs: jnp.sum(sum(dst32[i, l] * st[j, l][...].astype(f32)
                                            for i, j in pairs), axis=1)
          ends_s[l, 0] = inner(((w1, w1), (w2, w2)))
          if momentum:
            ends_s[l, 1] = inner(((w1, s1), (w2, s2)))
            ends_s[l, 2] = inner(((s1, s1), (s2, s2)))
        got.update(zip(products, mms(list(products.values()), during=ends)))
        got["dk_upd"] = row_of(ROW_END_X, d) * got["dk_w"]
        got["da_upd"] = row_of(ROW_END_X, u) * got["da_w"]
        if momentum:
          got["dk_upd"] = got["dk_upd"] + row_of(ROW_END_SX, d) * got["dk_s"]
          got["da_upd"] = got["da_upd"] + row_of(ROW_END_SX, u) * got["da_s"]
        if cumulative:
          zq = row_of(ROW_READ_W0, u) * got["zw"] + got["dp1"]
          if momentum:
            zq = zq + row_of(ROW_READ_S0, u) * got["zs"]
        else:
          zq = got["zw"]
        aq, daq, _ = act(zq)
        aq_s[l] = aq.astype(cd)
        plgpu.commit_smem()

        # Round 3: the read's layer 2 (and its cotangent back to Aq, A and E).
        daq_terms = [(transposed(W2, "w2t"), g_op)]
        products = {}
        if cumulative:
          if momentum:
            daq_terms.append((transposed(S2, "s2t"), g_s.at[1]))
            products["y2s"] = ([(S2, aq_s.at[l])], (d, chunk))
          daq_terms.append((a_s.at[l], m2_c))
          products["y2"] = ([(W2, aq_s.at[l])], (d, chunk))
          products["da_read"] = ([(aq_s.at[l], transposed(m2_c, "m2t"))], (u, chunk))
          products["de_read"] = ([(do_c, transposed(p2_s.at[slot, l], "p2t"))], (d, chunk))
        products["daq"] = (daq_terms, (u, chunk))
        got.update(zip(products, mms(list(products.values()))))
        dzq = got["daq"] * daq
        dzq_s[l] = dzq.astype(cd)
        if cumulative:
          g1_s[l, 0] = (row_of(ROW_READ_W0, u) * dzq).astype(cd)
          if momentum:
            g1_s[l, 1] = (row_of(ROW_READ_S0, u) * dzq).astype(cd)
        plgpu.commit_smem()
        g1_op = g1_s.at[l, 0] if cumulative else dzq_s.at[l]

        # Round 4 (cumulative): dZq through the read's mix, back to D.
        d_delta = row_of(ROW_END_X, u) * got["u1"]
        if momentum:
          d_delta = d_delta + row_of(ROW_END_SX, u) * got["us1"]
        if cumulative:
          d_delta = d_delta + mms([([(dzq_s.at[l], transposed(p1_c, "p1t"))], (u, chunk))])[0]
        d_bk = d_delta * da
        dbk_s[l] = d_bk.astype(cd)
        plgpu.commit_smem()

        # Round 5: this slice's part of dE, and of dQ.
        dq_terms = [(transposed(W1, "w1t"), g1_op)]
        if cumulative and momentum:
          dq_terms.append((transposed(S1, "s1t"), g1_s.at[l, 1]))
        de, dq = mms([([(W2, dbk_s.at[l])], (d, chunk)), (dq_terms, (d, chunk))])
        de = de + row_of(ROW_END_X, d) * got["u2"]
        if momentum:
          de = de + row_of(ROW_END_SX, d) * got["us2"]
        if cumulative:
          de = de + got["de_read"]
        parts.append(de)
        # The coefficients' elementwise products (product_fields order), summed in XLA.
        products = [got["u1"] * delta + got["u2"] * e32]
        if momentum:
          products.append(got["us1"] * delta + got["us2"] * e32)
        if cumulative:
          products.append(do32 * got["y2"] + dzq * got["zw"])
          if momentum:
            products.append(do32 * got["y2s"] + dzq * got["zs"])
        kept.append(dict(got=got, da=da, dz=d_delta * got["bk"] * dda, dq=dq, products=products))

      # The exchange: dE, summed in slice order by every program.
      xslot = lax.rem(i, 2)
      de = cluster_sum(parts, xsum_s.at[xslot], xbar.at[xslot], c, exchange)
      dy_s[...] = ((2.0 * de) if l2 else de).astype(cd)      # dY (l2); dV = -dy either way
      plgpu.commit_smem()

      # Phase B, per slice: dA, dZ, dK and the new carried cotangent's terms.
      p_w, q_s, r_s = (coef[index, 0] for index in (ROW_END_W0, ROW_END_S0, ROW_END_SS0))

      def carry(leaf, l, term, s_term):
        """The carried cotangent of one layer's blocks into the chunk's start: dW0 = p dW1 +
        term, dS0 = q dW1 + r dS1 + s_term (float32 and the compute-dtype copy)."""
        old = dst32[leaf, l]
        if momentum:
          new_s = q_s * old + r_s * dst32[leaf + 2, l]
          if s_term is not None:
            new_s = new_s + s_term
          dst32[leaf + 2, l] = new_s
          dstc[leaf + 2, l] = new_s.astype(cd)
        new = p_w * old + term
        dst32[leaf, l] = new
        dstc[leaf, l] = new.astype(cd)

      finals = []
      for l in range(local):
        k = kept[l]
        got = k["got"]
        W1, W2 = st.at[w1, l], st.at[w2, l]
        g1_op = g1_s.at[l, 0] if cumulative else dzq_s.at[l]

        def stage(k=k, l=l):
          """This slice's dQ and coefficient products into their staging buffers (their last
          copies out were waited for in phase A), beside the wgmmas."""
          dq_s[l] = k["dq"]
          for j, product in enumerate(k["products"]):
            prod_s[l, j] = product
        d_a = got["da_upd"]
        if cumulative:
          d_a = d_a + got["da_read"]
        if l2:
          d_a = d_a + mms([([(transposed(W2, "w2t"), dy_s)], (u, chunk))], during=stage)[0]
        dz = k["dz"] + d_a * k["da"]
        dz_s[l] = dz.astype(cd)
        plgpu.commit_smem()
        aq_t = transposed(aq_s.at[l], "aqt")
        both = momentum and cumulative
        # Layer 1's terms first; layer 2's wgmmas then run beside layer 1's carried update
        # (they read none of the carried blocks).
        layer1 = [([(transposed(W1, "w1t"), dz_s.at[l])], (d, chunk)),
                  ([(g1_op, transposed(qt_c, "qtt")),
                    (dz_s.at[l], transposed(kt_c, "ktt"))], (u, d))]
        if both:
          layer1.append(([(g1_s.at[l, 1], transposed(qt_c, "qtt"))], (u, d)))
        dk, tw1, *ts1 = mms(layer1, during=None if l2 else stage)
        tw2 = [(g_op, aq_t), (e_c, transposed(dbk_s.at[l], "dbkt"))]
        if l2:
          tw2.append((dy_s, transposed(a_s.at[l], "at")))
        layer2 = [(tw2, (d, u))] + ([([(g_s.at[1], aq_t)], (d, u))] if both else [])
        tw2, *ts2 = mms(layer2, during=lambda l=l, tw1=tw1, ts1=ts1: carry(
            w1, l, tw1, ts1[0] if ts1 else None))
        finals.append((dk, tw2, ts2[0] if ts2 else None))

      # Every read of this chunk's inputs and saved blocks is done: fetch the next chunk's.
      @pl.when(i + 1 < num_chunks)
      def _():
        if slots == 1:
          fetch(n - 1, 0)
        fetch_state(n - 1)

      for l in range(local):
        dk, tw2, ts2 = finals[l]
        dk_s[l] = dk + kept[l]["got"]["dk_upd"]
        carry(w2, l, tw2, ts2)
      plgpu.commit_smem()
      for l in range(local):
        s = c * local + l
        plgpu.copy_smem_to_gmem(dq_s.at[l], dq_g.at[r, s, n])
        plgpu.copy_smem_to_gmem(dk_s.at[l], dk_g.at[r, s, n])
        plgpu.copy_smem_to_gmem(prod_s.at[l], prod_g.at[r, s, n])
        plgpu.copy_smem_to_gmem(ends_s.at[l], ends_g.at[r, s, n])
        if cumulative:
          plgpu.copy_smem_to_gmem(dc_s.at[l], dc_g.at[r, s, n])
          plgpu.copy_smem_to_gmem(dzq_s.at[l], dzq_g.at[r, s, n])
      save_dy = lambda: plgpu.copy_smem_to_gmem(dy_s, dy_g.at[r, n])
      pl.when(c == 0)(save_dy) if exchange else save_dy()

    for j in range(n_states):
      for l in range(local):
        plgpu.copy_smem_to_gmem(dst32.at[j, l],
                                slice_block(d_init_g[j].at[r], j, c * local + l))
    plgpu.wait_smem_to_gmem(0)

  part = lambda *shape: jax.ShapeDtypeStruct((rows, n_slices, num_chunks) + shape, f32)
  out_types = [part(d, chunk), part(d, chunk), jax.ShapeDtypeStruct(qt.shape, cd),
               part(n_products, PRODUCT_ROWS, chunk)]
  if cumulative:
    out_types += [jax.ShapeDtypeStruct((rows, n_slices, num_chunks, u, chunk), cd)] * 2
  n_ends = 3 if momentum else 1
  out_types.append(part(n_ends, PRODUCT_ROWS))                                # ends
  out_types += [jax.ShapeDtypeStruct(x.shape, f32) for x in d_final]          # d_init
  # As in the forward: every wgmma operand buffer takes the swizzle of a C-token row.
  swizzle = plgpu.find_swizzle(chunk * jnp.dtype(cd).itemsize * 8)
  operand = lambda shape: _smem(shape, cd, swizzle)
  slot_types = [operand((slots, d, chunk))] * 4 + [plgpu.SMEM((slots, COEF_ROWS, chunk), f32)]
  if cumulative:
    slot_types += [operand((slots, chunk, chunk))] * 2 + [
        operand((slots, local, chunk, chunk))]                                # P1, M2; P2
  de_parts, de_barrier = exchange_types(n_slices, d, chunk)
  scratch = slot_types + [
      operand((n_states, local, u, d)),                                       # saved blocks
      _smem((n_states, local, u, d), f32), operand((n_states, local, u, d)),  # carried
      operand((local, u, chunk)), operand((local, u, chunk)),                 # A, D
      operand((local, u, chunk)),                                             # Aq
      operand((local, u, chunk)), operand((local, n_upd, u, chunk)),          # dZq, G1 (H1)
      operand((local, u, chunk)), operand((local, u, chunk)),                 # dBk, dZ
      operand((n_upd, d, chunk)),                                             # G (H)
      operand((d, chunk)),                                                    # dY
      plgpu.SMEM((local, d, chunk), f32), plgpu.SMEM((local, d, chunk), f32),  # dQ, dK parts
      plgpu.SMEM((local, n_products, PRODUCT_ROWS, chunk), f32),
      plgpu.SMEM((local, n_ends, PRODUCT_ROWS), f32),                          # ends
      de_parts,                                                               # peers' dE parts
      plgpu.Barrier(num_barriers=slots * n_loads + 2 * n_states * local), de_barrier]
  if interpret:
    scratch += [operand(shape) for shape in spare_shapes.values()]
  inputs = shared_inputs + ([p2] if cumulative else []) + list(saved) + list(d_final)
  # Its only reductions run along a block's rows, within each warp: no cross-warp scratch (2 KiB
  # otherwise) is needed, and Titans has none to spare.
  part = mgpu_launch.KernelPart(body, inputs, out_types, scratch, rows=rows, cluster=cluster,
                                cross_warp_reductions=False)

  def finish(results):
    dq, dk, dy, products = results[:4]
    dc, dzq = results[4:6] if cumulative else (None, None)
    ends, *d_init = results[4 + 2 * cumulative:]
    return dq, dk, dy, products, dc, dzq, ends, d_init
  return part, finish


def mlp_rows_backward(qt, kt, coefs: dict, states, aux, d_out, d_final, *, activation: str,
                      l2: bool, interpret, beside=()):
  """The row kernel's backward for a 2-layer mlp on this reverse walk, with the score terms
  in XLA around it (module docstring). qt, kt, d_out: [R, N, d, C] (features); coefs: the
  ChunkCoefs fields by name (features layout); states: every chunk's start state and aux what
  the forward re-run saved beside them, as chunk_rows_mgpu_mlp.mlp_rows_forward saves them for
  this walk (save_aux: the states in the compute dtype); beside: `mgpu_launch.KernelPart`s that
  run in the walk's launch on SMs of their own. Returns (dq, dk, dv in the compute dtype, the
  coefficients' gradients by name, the initial state's cotangent, each beside part's raw
  results)."""
  rows, num_chunks, _, chunk = qt.shape
  cd = qt.dtype
  packed, read_x = pack_coefficients(coefs, rows, num_chunks, chunk)
  cumulative = read_x is not None
  e = aux[0]
  d_out = d_out.astype(cd)
  products_of = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
  p1 = m2 = p2 = None
  if cumulative:
    scores1 = products_of("rndj,rndt->rnjt", kt, qt)           # K^T Q  [j, t]
    scores2 = aux[1]                                           # per slice A^T Aq
    d_p2 = products_of("rndj,rndt->rnjt", e, d_out)            # E^T dO
    p1 = (read_x * scores1).astype(cd)
    m2 = (read_x * d_p2).astype(cd)
    p2 = (read_x[:, :, None] * scores2).astype(cd)
  (dq, dk, dy, products, dc, dzq, ends, d_init), others = mlp_rows_reverse(
      qt, kt, d_out, e, packed, p1, m2, p2, [s.astype(cd) for s in states], list(d_final),
      activation=activation, l2=l2, interpret=interpret, beside=beside)
  dq, dk = dq.sum(axis=1), dk.sum(axis=1)
  d_read_x = None
  if cumulative:
    d_p1 = products_of("rsnuj,rsnut->rnjt", dc, dzq)           # sum over hidden units of D^T dZq
    m1 = (read_x * d_p1).astype(cd)
    dq = dq + products_of("rndj,rnjt->rndt", kt, m1)
    dk = dk + products_of("rndt,rnjt->rndj", qt, m1)
    d_read_x = scores1 * d_p1 + scores2.sum(axis=2) * d_p2
  ends = ends.sum(axis=(1, 4))                                # [R, N, 3 or 1]
  names = ("end_w0", "end_s0", "end_ss0")[:ends.shape[-1]]
  end_dots = {name: ends[:, :, i, None, None] for i, name in enumerate(names)}
  d_coefs = coefficient_grads(products.sum(axis=1), end_dots, d_read_x, coefs)
  return dq.astype(cd), dk.astype(cd), -dy, d_coefs, d_init, others
