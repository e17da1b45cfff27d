"""The 2-layer mlp memory's chunk step with its state in memory, streamed in hidden-unit slices.

Why: a Titans mlp state (W and S of both layers, d = 64, hidden 256, float32) is 256 KiB, the
whole register file of an SM. Carried as a loop value it spills, and the spills of every program
share L2/HBM bandwidth (docs/kernel_notes.md, v4: a chunk step costs 2.6x more with 192 programs
than with 12). Here the state stays in a memory buffer (the kernel's final-state output: L2/HBM
on GPU, the resident VMEM block on TPU) and each chunk step loads, updates and stores it one slice
of `hs` hidden units at a time, so only one slice is live.

Why it decomposes: with W0 [h, d] and W1 [d, h], everything a chunk step does is a sum over hidden
units of per-unit terms once the keys' loss gradient dy [C, d] is known:
    keys      y = sum_j act(k W0_j^T) W1_j^T                     (needs every slice: pass A)
    per slice delta0_j = (dy W1_j) * act'(k W0_j^T);  read, update of slice j   (pass B)
    read      out = sum_j p_j + (read_x o sum_j g_j) dy          (cumulative; g_j [C, C])
so a forward chunk step is pass A over the slices, then pass B over the slices. The functions
below are pure (values in, values out); the bodies load and store the slices and take their
vjps one slice at a time, so the backward is autodiff of the very same per-slice math (there is
no hand-written adjoint to drift from the forward). Matmul rounding is `chunk_memory._chunk_step`'s
(operands in the compute dtype, float32 accumulation); only the order of float32 sums differs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from tnt_jax.kernels.step_math import act_and_grad, mm, one_dtype_per_matmul


def slice_index(layer: int, j: int, width: int):
  """Index of hidden slice j in layer `layer`'s [out, in] matrix: rows of W0, columns of W1."""
  hidden = pl.ds(j * width, width)
  return (hidden, slice(None)) if layer == 0 else (slice(None), hidden)


def _keys_out(w0, w1, k, *, act, cd):
  """Slice j's part of the keys' forward at the chunk-start state: act(k W0_j^T) W1_j^T."""
  acc = jnp.promote_types(cd, jnp.float32)
  z = mm(k.astype(acc), w0, cd, transpose_y=True)
  return mm(act_and_grad(act, z)[0], w1, cd, transpose_y=True)


def _scores(q, k, cd):
  acc = jnp.promote_types(cd, jnp.float32)
  return mm(q.astype(acc), k.astype(acc), cd, transpose_y=True)


def _loss_grad(y, v, loss):
  """d loss / d y per token (float32; the dot loss does not depend on y)."""
  if loss == "l2":
    return 2.0 * (y - v.astype(y.dtype))
  return -v.astype(jnp.promote_types(v.dtype, jnp.float32))


def _slice_update(state, q, k, dy, qk, coefs: dict, *, act, cd, read, has_momentum):
  """Slice j's read terms and update. state: [W0_j, W1_j] (+ [S0_j, S1_j]).
  Returns (new state, p_j [C, d], g_j [C, C] or None for chunk_start)."""
  acc = jnp.promote_types(cd, jnp.float32)
  w0, w1 = state[:2]
  s0, s1 = state[2:] if has_momentum else (None, None)
  k = k.astype(acc)
  z = mm(k, w0, cd, transpose_y=True)                          # [C, hs]
  a, da = act_and_grad(act, z)
  delta0 = mm(dy, w1, cd) * da                                 # d loss / d z, [C, hs]

  x = q.astype(acc)
  if read == "cumulative":
    zq = coefs["read_w0"] * mm(x, w0, cd, transpose_y=True)
    if has_momentum:
      zq = zq + coefs["read_s0"] * mm(x, s0, cd, transpose_y=True)
    zq = zq + mm(coefs["read_x"] * qk, delta0, cd)
    x1 = act_and_grad(act, zq)[0]
    p = coefs["read_w0"] * mm(x1, w1, cd, transpose_y=True)
    if has_momentum:
      p = p + coefs["read_s0"] * mm(x1, s1, cd, transpose_y=True)
    g = mm(x1, a, cd, transpose_y=True)
  else:
    x1 = act_and_grad(act, mm(x, w0, cd, transpose_y=True))[0]
    p, g = mm(x1, w1, cd, transpose_y=True), None

  outer = lambda coef, delta, inputs: mm((coef * delta).T, inputs, cd)
  new = [coefs["end_w0"] * w0 + outer(coefs["end_x"], delta0, k),
         coefs["end_w0"] * w1 + outer(coefs["end_x"], dy, a)]
  if has_momentum:
    new = [new[0] + coefs["end_s0"] * s0, new[1] + coefs["end_s0"] * s1,
           coefs["end_ss0"] * s0 + outer(coefs["end_sx"], delta0, k),
           coefs["end_ss0"] * s1 + outer(coefs["end_sx"], dy, a)]
  return new, p, g


def _combine(p, g, dy, coefs: dict, *, cd, read):
  """The chunk's outputs from the slices' summed read terms."""
  if read != "cumulative":
    return p
  return p + mm(coefs["read_x"] * g, dy, cd)


class SlicedStep:
  """Forward and backward chunk-step bodies over a state held in refs, slice by slice.

  Refs are indexed with numpy-style tuples; `sync()` orders one pass's stores before the next
  pass's loads across the program's threads (a CTA barrier on GPU; a no-op where a program is
  one thread of control).
  """

  def __init__(self, config, coef_fields, has_momentum: bool, width: int, hidden: int, cd,
               sync):
    if hidden % width:
      raise ValueError(f"KernelBlocks.hidden_slice={width} must divide the mlp's hidden width "
                       f"{hidden}")
    self.loss, self.read = config.loss, config.read
    self.act, self.cd = config.model.activation, cd
    self.coef_fields = coef_fields
    self.has_momentum = has_momentum
    self.width, self.num_slices = width, hidden // width
    self.layers = 4 if has_momentum else 2            # [W0, W1, S0, S1] in carry order
    self.sync = sync
    self.update = lambda state, q, k, dy, qk, coefs: _slice_update(
        state, q, k, dy, qk, coefs, act=self.act, cd=cd, read=self.read,
        has_momentum=has_momentum)

  def _load(self, refs, j):
    return [refs[i][slice_index(i % 2, j, self.width)] for i in range(self.layers)]

  def _store(self, refs, j, values):
    for i, value in enumerate(values):
      refs[i][slice_index(i % 2, j, self.width)] = value.astype(refs[i].dtype)

  def _keys_grad(self, state_refs, k, v):
    """dy = d loss / d (keys' output) at the chunk-start state (pass A)."""
    if self.loss != "l2":
      return _loss_grad(None, v, self.loss)
    y = None
    for j in range(self.num_slices):
      w0, w1 = self._load(state_refs, j)[:2]
      y_j = _keys_out(w0, w1, k, act=self.act, cd=self.cd)
      y = y_j if y is None else y + y_j
    return _loss_grad(y, v, self.loss)

  def forward(self, state_refs, q, k, v, coef_values):
    """One chunk: updates state_refs in place, returns out [C, d] float32."""
    coefs = dict(zip(self.coef_fields, coef_values))
    qk = _scores(q, k, self.cd) if self.read == "cumulative" else None
    dy = self._keys_grad(state_refs, k, v)
    p_sum = g_sum = None
    for j in range(self.num_slices):
      new, p, g = self.update(self._load(state_refs, j), q, k, dy, qk, coefs)
      self.sync()                 # every thread has read slice j before it is overwritten
      self._store(state_refs, j, new)
      p_sum = p if p_sum is None else p_sum + p
      if g is not None:
        g_sum = g if g_sum is None else g_sum + g
    return _combine(p_sum, g_sum, dy, coefs, cd=self.cd, read=self.read)

  def backward(self, saved_refs, d_state_refs, q, k, v, coef_values, d_out):
    """The vjp of one chunk at its saved start state (saved_refs, read only). d_state_refs hold
    the cotangent of the chunk's end state and are overwritten with its start state's.
    Returns (dq, dk, dv, d_coef_values)."""
    acc = jnp.promote_types(self.cd, jnp.float32)
    cd, read = self.cd, self.read
    coefs = dict(zip(self.coef_fields, coef_values))
    vjp = lambda fn, primals, cotangent: one_dtype_per_matmul(
        lambda p, c: jax.vjp(fn, *p)[1](c))(list(primals), cotangent)

    qk = _scores(q, k, cd) if read == "cumulative" else None
    dy = self._keys_grad(saved_refs, k, v)
    # The combine's cotangents: it is linear in p, so its primal value does not matter.
    g_sum = None
    if read == "cumulative":
      for j in range(self.num_slices):
        g = self.update(self._load(saved_refs, j), q, k, dy, qk, coefs)[2]
        g_sum = g if g_sum is None else g_sum + g
    d_p, d_g, d_dy, d_coefs = vjp(
        lambda p, g, dy, c: _combine(p, g, dy, c, cd=cd, read=read),
        (jnp.zeros_like(d_out, acc), g_sum, dy, coefs), d_out.astype(acc))

    # Pass B in reverse: each slice's update and read terms.
    dq = dk = d_qk = None
    add = lambda a, b: b if a is None else (a if b is None else a + b)
    for j in range(self.num_slices):
      d_new = self._load(d_state_refs, j)
      d_slice, dq_j, dk_j, d_dy_j, d_qk_j, d_coefs_j = vjp(
          self.update, (self._load(saved_refs, j), q, k, dy, qk, coefs), (d_new, d_p, d_g))
      self.sync()
      self._store(d_state_refs, j, d_slice)
      dq, dk, d_qk = add(dq, dq_j), add(dk, dk_j), add(d_qk, d_qk_j)
      d_dy = d_dy + d_dy_j
      d_coefs = {f: add(d_coefs[f], d_coefs_j[f]) for f in d_coefs}
    self.sync()

    # Pass A in reverse: the loss gradient and the keys' forward.
    if self.loss == "l2":
      d_y, dv = vjp(lambda y, v: _loss_grad(y, v, self.loss),
                    (jnp.zeros_like(d_dy), v.astype(acc)), d_dy)   # linear in y
      for j in range(self.num_slices):
        w0, w1 = self._load(saved_refs, j)[:2]
        dw0, dw1, dk_j = vjp(lambda w0, w1, k: _keys_out(w0, w1, k, act=self.act, cd=cd),
                             (w0, w1, k), d_y)
        d_w = self._load(d_state_refs, j)[:2]
        self.sync()
        self._store(d_state_refs[:2], j, [d_w[0] + dw0, d_w[1] + dw1])
        dk = dk + dk_j
      self.sync()
    else:
      dv = -d_dy
    if read == "cumulative":
      dq_s, dk_s = vjp(lambda q, k: _scores(q, k, cd), (q, k), d_qk)
      dq, dk = dq + dq_s, dk + dk_s
    return dq, dk, dv, [d_coefs[f] for f in self.coef_fields]
