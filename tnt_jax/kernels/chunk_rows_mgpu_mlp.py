"""Mosaic GPU (Hopper wgmma) forward of the row kernel for a 2-layer mlp memory, its hidden units
split over a thread-block cluster.

The Titans mlp state at d = 64, hidden 256 (W1, W2 and the momentum S1, S2: 256 KiB in float32)
fits neither one SM's registers nor its shared memory; the Pallas (Triton) row kernel spills it
(docs/kernel_notes.md v6). Here a row's hidden units are split into slices of UNITS = 64, and each
slice runs in its own program of a cluster (one per SM), holding only its slice of the state in
shared memory: W1's rows [U, d] and W2's columns [d, U] (and S's), each a [64, 64] block.

Per chunk, in the "features" layout ([width, C] activations; chunk_rows_mgpu has the linear
memory's form), with slice s's blocks W1s, W2s, S1s, S2s rounded to the compute dtype:

    Z = W1s K,  A = act(Z)                                                    [U, C]
    Y = sum_s W2s A_s            (the one exchange: every program's [d, C] part, over the cluster)
    E = dl/dy (2 (Y - V), or -V for the dot loss)                             [d, C]
    D = (W2s^T E) * act'(Z)                                                   [U, C]
    read, layer 1:  Zq = a (W1s Q) + b (S1s Q) + D (X * (K^T Q))      (chunk-start: Zq = W1s Q)
    read, layer 2:  O_s = a (W2s Aq) + b (S2s Aq) + E (X * (A^T Aq)),  Aq = act(Zq)
    update:  W1s' = p W1s + q S1s + (c D) K^T,   S1s' = r S1s + (s D) K^T
             W2s' = p W2s + q S2s + (c E) A^T,   S2s' = r S2s + (s E) A^T

Every term but Y and the output is the slice's own: a 2-layer mlp's hidden units couple only
through the layer-2 sum. Y is summed before E is formed (each program stores its part into every
program's shared memory, `plgpu.async_store_smem`, and sums the parts in slice order, so every
program holds the same Y). The output's parts (the A^T Aq scores are a sum over hidden units too)
leave the kernel in float32 and XLA adds them, which is the same sum in another order.

A^T Aq and the update's A^T need A token-major: A is also computed at 64 zero-padded tokens
(Z from the keys' padded token-major copy, act(0) = 0 for every activation here) and read
through `plgpu.transpose_ref`. The interpreter has neither transposed refs nor cluster stores:
interpreted, one program runs every slice of its row in turn (the same per-slice code, the parts
summed in the same order) and transposes are written into spare buffers. Chunk inputs arrive by
TMA one chunk ahead (two slots), as in chunk_rows_mgpu.

Backward: the row kernel's custom_vjp re-runs this forward per checkpoint group, saving every
chunk's start state and, for the reverse walk, E and the read's layer-2 scores (`save_aux`), and
walks the group with kernels/chunk_rows_mgpu_mlp_reverse.py on the same cluster where that fits
in shared memory, else with the Pallas reverse kernel (Triton on the GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tnt_jax.kernels import mgpu_launch
from tnt_jax.kernels.chunk_rows_mgpu import (CHUNKS, COEF_ROWS, ROW_END_S0, ROW_END_SS0,
                                             ROW_END_SX, ROW_END_W0, ROW_END_X, ROW_READ_S0,
                                             ROW_READ_W0, SCORE_ROWS, mms)
from tnt_jax.kernels.chunk_start_mgpu import (SMEM_BYTES, _plgpu, _smem,
                                              _store, hopper_reason, operand_reason)
from tnt_jax.kernels.step_math import act_and_grad

UNITS = 64           # hidden units per program: the M of its layer-1 products
SLICES = (1, 2, 4)   # programs per cluster (the exchange buffer grows with it; the backward's
                     # Pallas reverse kernel takes power-of-2 widths only)
SLICES_OF_UNITS = tuple(UNITS * s for s in SLICES)
HEAD_DIM = 64        # d: every state block is [64, 64]


def smem_bytes(head_dim: int, chunk: int, momentum: bool, slices: int,
               aux: bool = False) -> int:
  """Shared memory of one compiled program (one slice): its state blocks (float32 + compute-dtype
  copy), two slots of chunk inputs, the exchange buffer and the staging buffers; aux: also the
  read's scores, staged when saving them for the reverse walk (`save_aux`, cumulative read)."""
  d, u, blocks, n_upd = head_dim, UNITS, 4 if momentum else 2, 2 if momentum else 1
  state = blocks * u * d * (4 + 2)
  inputs = 2 * (3 * d * chunk * 2 + SCORE_ROWS * d * 2 + COEF_ROWS * chunk * 4
                + SCORE_ROWS * chunk * 4)
  exchange = exchange_bytes(slices, d, chunk)          # the peers' parts of Y
  staging = (u * chunk * 2 * (3 + n_upd) + u * SCORE_ROWS * 2 + d * chunk * 2 * (1 + n_upd)
             + SCORE_ROWS * chunk * 2 * 2 + d * chunk * 4)
  staging += SCORE_ROWS * chunk * 4 if aux else 0
  return state + inputs + exchange + staging + 4096      # + barriers and alignment


def unsupported_reason(config, head_dim: int, dtype, chunk: int, *, compiled: bool) -> str | None:
  """Why this kernel cannot run the forward of this op (None when it can). chunk: the kernel's
  (padded) chunk; compiled: on a GPU rather than the interpreter."""
  model = config.model
  kernel = "mlp row kernel"
  if model.kind != "mlp" or model.depth != 2:
    return (f"memory model kind={model.kind!r} depth={getattr(model, 'depth', 1)} (the Mosaic "
            f"GPU {kernel} does 2-layer mlp memories)")
  if (reason := operand_reason(kernel, head_dim, dtype)) is not None:
    return reason
  if head_dim != HEAD_DIM:
    return f"head_dim={head_dim} (the Mosaic GPU {kernel} takes head_dim={HEAD_DIM})"
  hidden = model.hidden_dim(head_dim)
  if hidden not in SLICES_OF_UNITS:
    return (f"mlp hidden width {hidden} (the Mosaic GPU {kernel} splits it into "
            f"{', '.join(map(str, SLICES))} slices of {UNITS} units)")
  if chunk not in CHUNKS:
    return (f"chunk={chunk} (padded from {config.chunk_size}): the Mosaic GPU {kernel} takes "
            f"chunks of {CHUNKS} tokens")
  need = smem_bytes(head_dim, chunk, config.rule.has_momentum, hidden // UNITS)
  if need > SMEM_BYTES:
    return (f"shared memory {need} bytes at head_dim={head_dim}, hidden {hidden}, chunk={chunk} "
            f"> {SMEM_BYTES} for the {kernel}")
  return hopper_reason(kernel) if compiled else None


def slice_block(leaf_ref, leaf: int, hidden_slice):
  """The [64, 64] block of hidden slice `hidden_slice` in a state leaf's view [.., h, d] (W1,
  S1: its rows) or [.., d, h] (W2, S2: its columns), for a TMA copy to or from shared memory."""
  units = pl.ds(hidden_slice * UNITS, UNITS)
  return leaf_ref.at[units, :] if leaf % 2 == 0 else leaf_ref.at[:, units]


def _exchange_peers(slices: int) -> int:
  """The parts a program of `slices` receives per exchange (1, unused, for one slice)."""
  return max(slices - 1, 1)


def exchange_bytes(slices: int, head_dim: int, chunk: int) -> int:
  """Shared memory of `exchange_types`' buffer."""
  return 2 * _exchange_peers(slices) * head_dim * chunk * 4


def exchange_types(slices: int, head_dim: int, chunk: int) -> tuple:
  """cluster_sum's scratch: the buffer of the peers' float32 [d, C] parts for two exchanges in
  flight ([2, slices - 1, d, C]) and their two barriers (arrivals: one per peer)."""
  peers = _exchange_peers(slices)
  return (_smem((2, peers, head_dim, chunk), jnp.float32),
          _plgpu().Barrier(num_arrivals=peers, num_barriers=2))


def cluster_sum(parts, buffer, barrier, program, exchange: bool):
  """The sum over a row's hidden slices of a float32 [d, C] value, the same in every program.
  Exchanged (compiled): `parts` is this program's one part; it is stored into every other
  cluster peer's `buffer` ([slices - 1, d, C] in shared memory, one per exchange in flight;
  peer p keeps program s's part at s - (s > p): no slot for its own), completing on that peer's
  `barrier` (arrivals: slices - 1). Then the slices' parts are added in slice order, this
  program's own from registers, so every program adds the same values in the same order. Not
  exchanged (one program walks every slice): parts has one per slice, added in that order."""
  if not exchange:
    total = parts[0]
    for part in parts[1:]:
      total = total + part
    return total
  plgpu = _plgpu()
  slices = buffer.shape[0] + 1
  own = parts[0]
  slot_of = lambda sender, receiver: sender - (sender > receiver).astype(jnp.int32)
  for offset in range(1, slices):
    peer = lax.rem(program + offset, jnp.int32(slices))      # int32 under x64 too
    plgpu.async_store_smem(own, buffer.at[slot_of(program, peer)], barrier, cluster_idx=peer,
                           cluster_dim="slices")
  plgpu.barrier_wait(barrier)
  total = None
  for s in range(slices):
    # Slot s - (s > program), clipped: at s == program it reads a peer's part, unused.
    other = buffer[jnp.minimum(slot_of(jnp.int32(s), program), slices - 2)]
    is_own = lax.broadcast_in_dim(program == s, own.shape, ())   # no implicit broadcast here
    term = lax.select(is_own, own, other)
    total = term if total is None else total + term
  return total


def mlp_rows_forward(qt, kt, vt, packed, read_x, state, *, activation: str, l2: bool,
                     save_every: int | None, interpret, save_aux: bool = False,
                     outputs: bool = True):
  """The forward over every row's chunks, in a launch of its own (`mlp_forward_part`)."""
  part, finish = mlp_forward_part(qt, kt, vt, packed, read_x, state, activation=activation,
                                  l2=l2, save_every=save_every, interpret=interpret,
                                  save_aux=save_aux, outputs=outputs)
  return finish(mgpu_launch.launch([part], interpret=interpret)[0])


def mlp_forward_part(qt, kt, vt, packed, read_x, state, *, activation: str, l2: bool,
                     save_every: int | None, interpret, save_aux: bool = False,
                     outputs: bool = True):
  """The forward over every row's chunks as a `mgpu_launch.KernelPart`, with the function that
  turns its results into (out, final, saved).

  qt, kt, vt: [R, N, d, C] compute dtype (features layout); packed [R, N, 8, C] and read_x
  [R, N, C, C] float32 or None (chunk_rows_mgpu.pack_coefficients); state: [W1, W2] or
  [W1, W2, S1, S2] float32 ([R, h, d], [R, d, h]). Returns (out [R, N, d, C] compute dtype,
  final (as state), saved: the start states of chunks 0, s, 2s, ... ([R, ceil(N / s), ...] per
  leaf) for save_every=s, [] for None). save_aux (with save_every=1) saves what the mlp
  reverse walk (chunk_rows_mgpu_mlp_reverse) reads: the states in the compute dtype (its wgmma
  operands; the copies this kernel computes with), then every chunk's E rounded to the compute
  dtype [R, N, d, C] and, for the cumulative read, each slice's layer-2 read scores A^T Aq
  [R, N, slices, C, C] float32 ([j, t]); every saved array's chunk axis is its second.
  outputs=False (the backward's re-run, with save_aux) writes no output (out is None) and skips
  the read's layer 2."""
  if save_aux and save_every != 1:
    raise ValueError(f"save_aux needs save_every=1 (the reverse walk reads every chunk's E); "
                     f"got save_every={save_every!r}")
  if not (outputs or save_aux):
    raise ValueError("outputs=False is the backward's re-run: it needs save_aux=True")
  plgpu = _plgpu()
  rows, num_chunks, d, chunk = qt.shape
  cd = qt.dtype
  f32 = jnp.float32
  n_slices = state[0].shape[1] // UNITS
  cluster = 1 if interpret else n_slices         # programs per row
  local = n_slices // cluster                   # slices per program
  momentum = len(state) == 4
  cumulative = read_x is not None
  n_states = len(state)
  w1, w2, s1, s2 = 0, 1, 2, 3                   # state leaves
  keys = jnp.swapaxes(kt, 2, 3)                 # [R, N, C, d]: token-major keys
  n_saved = 0 if save_every is None else -(-num_chunks // save_every)
  n_aux = (1 + cumulative) if save_aux else 0
  save_scores = save_aux and cumulative
  inputs = [qt, kt, vt, keys, packed] + ([read_x] if cumulative else [])
  n_loads = len(inputs)
  exchange = cluster > 1
  act = lambda z: act_and_grad(activation, z)

  def body(r, *refs):
    ins, refs = refs[:n_loads], refs[n_loads:]
    state_g, refs = refs[:n_states], refs[n_states:]
    out_g, refs = (refs[0], refs[1:]) if outputs else (None, refs)
    final_g, refs = refs[:n_states], refs[n_states:]
    saved_g, refs = (refs[:n_states], refs[n_states:]) if n_saved else ((), refs)
    aux_g, refs = refs[:n_aux], refs[n_aux:]
    (st32, stcd, qt_s, kt_s, vt_s, keys_s, coef_s, rx_s, a_s, ap_s, d_s, cd_s, aq_s, e_s, ce_s,
     p1_s, p2_s, ysum_s, o_s, barrier, xbar, *spares) = refs
    sc_s = spares.pop(0) if save_scores else None
    c = lax.axis_index("slices") if exchange else 0
    slots = [qt_s, kt_s, vt_s, keys_s, coef_s] + ([rx_s] if cumulative else [])

    def transposed(ref, spare):
      """ref^T as a wgmma operand: a transposed view when compiled, a written copy when not."""
      if not interpret:
        return plgpu.transpose_ref(ref, (1, 0))
      spares[spare][...] = ref[...].T
      return spares[spare]

    def fetch(n, slot):
      for i, (src, dst) in enumerate(zip(ins, slots)):
        dst = dst.at[slot]
        if i == 3 or (cumulative and i == 5):
          dst = dst.at[:chunk]                             # rows past C stay zero
        plgpu.copy_gmem_to_smem(src.at[r, n], dst, barrier.at[slot * n_loads + i])

    for slot in range(2):
      keys_s[slot] = jnp.zeros((SCORE_ROWS, d), cd)
      if cumulative:
        rx_s[slot] = jnp.zeros((SCORE_ROWS, chunk), f32)
    state_barrier = 2 * n_loads
    for i in range(n_states):
      for l in range(local):
        plgpu.copy_gmem_to_smem(slice_block(state_g[i].at[r], i, c * local + l),
                                st32.at[i, l],
                                barrier.at[state_barrier + i * local + l])
    for i in range(n_states):
      for l in range(local):
        plgpu.barrier_wait(barrier.at[state_barrier + i * local + l])
        stcd[i, l] = st32[i, l].astype(cd)
    plgpu.commit_smem()
    fetch(0, 0)

    def row_of(slot, index, width):
      return lax.broadcast_in_dim(coef_s[slot, index], (width, chunk), (1,))

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
            for l in range(local):
              plgpu.copy_smem_to_gmem((stcd if save_aux else st32).at[i, l], slice_block(
                  saved_g[i].at[r, n // save_every], i, c * local + l))

      qt_c, kt_c, keys_c = qt_s.at[slot], kt_s.at[slot], keys_s.at[slot]
      keys_t = transposed(keys_c, 0)                         # [d, 64 padded tokens]
      # Round 1 (per slice): layer 1 at the keys, at the padded keys and at the queries.
      kept, y_parts = [], []
      for l in range(local):
        products = [([(stcd.at[w1, l], kt_c)], (UNITS, chunk)),
                    ([(stcd.at[w1, l], keys_t)], (UNITS, SCORE_ROWS)),
                    ([(stcd.at[w1, l], qt_c)], (UNITS, chunk))]
        if cumulative and momentum:
          products.append(([(stcd.at[s1, l], qt_c)], (UNITS, chunk)))
        if cumulative and l == 0:
          products.append(([(keys_c, qt_c)], (SCORE_ROWS, chunk)))
        z, zp, zw, *rest = mms(products)
        a, da = act(z)
        a_s[l] = a.astype(cd)
        ap_s[l] = act(zp)[0].astype(cd)
        plgpu.commit_smem()
        y_parts.append(mms([([(stcd.at[w2, l], a_s.at[l])], (d, chunk))])[0])
        kept.append((da, zw, rest))
      scores_kq = kept[0][2][-1] if cumulative else None

      # The exchange: Y, summed in slice order by every program.
      y = cluster_sum(y_parts, ysum_s.at[slot], xbar.at[slot], c, exchange)
      v = vt_s[slot].astype(f32)
      e = 2.0 * (y - v) if l2 else -v
      e_s[...] = e.astype(cd)
      if save_aux:                       # E is the same in every program: the first saves it
        plgpu.commit_smem()
        save_e = lambda: plgpu.copy_smem_to_gmem(e_s, aux_g[0].at[r, n])
        pl.when(c == 0)(save_e) if exchange else save_e()
      ce_s[0] = (row_of(slot, ROW_END_X, d) * e).astype(cd)
      if momentum:
        ce_s[1] = (row_of(slot, ROW_END_SX, d) * e).astype(cd)
      if cumulative:
        p1_s[...] = (rx_s[slot] * scores_kq).astype(cd)
      plgpu.commit_smem()

      key_rows = keys_c.at[:chunk]
      for l in range(local):
        da, zw, rest = kept[l]
        # Round 3: the error pulled back through layer 2, then layer 1's delta D.
        back = mms([([(transposed(stcd.at[w2, l], 1), e_s)], (UNITS, chunk))])[0]
        delta = back * da
        d_s[l] = delta.astype(cd)
        cd_s[l, 0] = (row_of(slot, ROW_END_X, UNITS) * delta).astype(cd)
        if momentum:
          cd_s[l, 1] = (row_of(slot, ROW_END_SX, UNITS) * delta).astype(cd)
        plgpu.commit_smem()
        # Round 4: the read's layer-1 mix and the update's outer products.
        a_t = transposed(a_s.at[l], 2)                      # [C, U]
        products = [([(cd_s.at[l, 0], key_rows)], (UNITS, d)),
                    ([(ce_s.at[0], a_t)], (d, UNITS))]
        if momentum:
          products += [([(cd_s.at[l, 1], key_rows)], (UNITS, d)),
                       ([(ce_s.at[1], a_t)], (d, UNITS))]
        if cumulative:
          products.append(([(d_s.at[l], p1_s.at[:chunk])], (UNITS, chunk)))
        upd = mms(products)
        if cumulative:
          zq = row_of(slot, ROW_READ_W0, UNITS) * zw + upd[-1]
          if momentum:
            zq = zq + row_of(slot, ROW_READ_S0, UNITS) * rest[0]
        else:
          zq = zw
        aq_s[l] = act(zq)[0].astype(cd)
        plgpu.commit_smem()

        def update(leaf, l=l, upd=upd):
          """The slice's state update of one layer (W, S), in float32 and its compute-dtype
          copy. Layer 1's blocks are read by no later product of the chunk, so it runs beside
          round 5's wgmmas; layer 2's after them. The chunk-start state's save (a copy out of
          these buffers) is waited for first."""
          if n_saved and leaf == w1:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          p_w0, q_s0 = scalar_of(slot, ROW_END_W0), scalar_of(slot, ROW_END_S0)
          new_upd, new_s_upd = (upd[leaf], upd[leaf + 2] if momentum else None)
          old_w = st32[leaf, l]
          new_w = p_w0 * old_w + new_upd
          if momentum:
            old_s = st32[leaf + 2, l]
            new_w = new_w + q_s0 * old_s
            new_s = scalar_of(slot, ROW_END_SS0) * old_s + new_s_upd
            st32[leaf + 2, l] = new_s
            stcd[leaf + 2, l] = new_s.astype(cd)
          st32[leaf, l] = new_w
          stcd[leaf, l] = new_w.astype(cd)

        # Round 5: layer 2 of the read; its scores against the keys' hidden activations. The
        # backward's re-run (outputs=False) writes no output: only the scores its walk reads.
        if not outputs:
          # Earlier copies from shared memory (this chunk's saved state's too) are done.
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          if save_scores:
            sc_s[l] = mms([([(transposed(ap_s.at[l], 3), aq_s.at[l])], (SCORE_ROWS, chunk))],
                          during=lambda: update(w1))[0]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(sc_s.at[l, :chunk], aux_g[1].at[r, n, c * local + l])
          else:
            update(w1)
          update(w2)
        else:
          products = [([(stcd.at[w2, l], aq_s.at[l])], (d, chunk))]
          if cumulative:
            products.append(([(transposed(ap_s.at[l], 3), aq_s.at[l])], (SCORE_ROWS, chunk)))
            if momentum:
              products.append(([(stcd.at[s2, l], aq_s.at[l])], (d, chunk)))
          read = mms(products, during=lambda: update(w1))
          out = read[0]
          if cumulative:
            p2_s[...] = (rx_s[slot] * read[1]).astype(cd)
            plgpu.commit_smem()
            out = row_of(slot, ROW_READ_W0, d) * out + mms(
                [([(e_s, p2_s.at[:chunk])], (d, chunk))], during=lambda: update(w2))[0]
            if momentum:
              out = out + row_of(slot, ROW_READ_S0, d) * read[2]
          else:
            update(w2)
          # Its wait for earlier copies from shared memory covers this chunk's saved state too.
          _store(out, o_s, out_g.at[r, c * local + l, n])
          if save_scores:                  # after _store's wait: the last chunk's copy is done
            sc_s[l] = read[1]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(sc_s.at[l, :chunk], aux_g[1].at[r, n, c * local + l])
        plgpu.commit_smem()

    for i in range(n_states):
      for l in range(local):
        plgpu.copy_smem_to_gmem(st32.at[i, l],
                                slice_block(final_g[i].at[r], i, c * local + l))
    plgpu.wait_smem_to_gmem(0)

  # The state leaves stay in their own layout; each program copies its slice's blocks.
  out_types = [jax.ShapeDtypeStruct((rows, n_slices, num_chunks, d, chunk), f32)] if outputs else []
  out_types += [jax.ShapeDtypeStruct(x.shape, f32) for x in state]
  saved_dtype = cd if save_aux else f32
  out_types += [jax.ShapeDtypeStruct((rows, n_saved) + x.shape[1:], saved_dtype)
                for x in state] if n_saved else []
  if save_aux:
    out_types.append(jax.ShapeDtypeStruct((rows, num_chunks, d, chunk), cd))
    if cumulative:
      out_types.append(jax.ShapeDtypeStruct((rows, num_chunks, n_slices, chunk, chunk), f32))
  # A wgmma's two shared-memory operands share one tiling: every operand buffer takes the
  # swizzle of a C-token row (32 bytes at C = 16).
  swizzle = plgpu.find_swizzle(chunk * jnp.dtype(cd).itemsize * 8)
  operand = lambda shape: _smem(shape, cd, swizzle)
  n_upd = 2 if momentum else 1
  y_parts, y_barrier = exchange_types(n_slices, d, chunk)
  scratch = [
      _smem((n_states, local, UNITS, d), f32), operand((n_states, local, UNITS, d)),
      operand((2, d, chunk)), operand((2, d, chunk)), operand((2, d, chunk)),
      operand((2, SCORE_ROWS, d)), plgpu.SMEM((2, COEF_ROWS, chunk), f32),
      plgpu.SMEM((2, SCORE_ROWS, chunk), f32),
      operand((local, UNITS, chunk)), operand((local, UNITS, SCORE_ROWS)),     # A, A (padded)
      operand((local, UNITS, chunk)), operand((local, n_upd, UNITS, chunk)),  # D, (c D, s D)
      operand((local, UNITS, chunk)),                                         # Aq
      operand((d, chunk)), operand((n_upd, d, chunk)),                        # E, (c E, s E)
      operand((SCORE_ROWS, chunk)), operand((SCORE_ROWS, chunk)),             # P1, P2
      y_parts,                                                                # peers' Y parts
      plgpu.SMEM((d, chunk), f32),                                            # out staging
      plgpu.Barrier(num_barriers=2 * n_loads + n_states * local), y_barrier]
  if save_scores:
    scratch.append(plgpu.SMEM((local, SCORE_ROWS, chunk), f32))
  if interpret:   # transposed copies (`transposed`): keys^T, W2s^T, A^T, A (padded)^T
    scratch += [operand((d, SCORE_ROWS)), operand((UNITS, d)), operand((chunk, UNITS)),
                operand((SCORE_ROWS, UNITS))]
  # No reduction crosses warps (cross_warp_reductions=False): the 2 KiB of scratch it would
  # take stay free.
  part = mgpu_launch.KernelPart(body, [*inputs, *state], out_types, scratch, rows=rows,
                                cluster=cluster, cross_warp_reductions=False)

  def finish(results):
    out = None                         # outputs=False: the backward's re-run
    if outputs:
      out, *results = results
      out = out.sum(axis=1).astype(cd)
    final = list(results[:n_states])
    saved = list(results[n_states:]) if n_saved else []
    return out, final, saved
  return part, finish
