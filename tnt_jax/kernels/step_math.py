"""Matmul and activation helpers shared by the kernel bodies (chunk_memory, sliced_mlp).

Everything here is plain jnp that both Pallas lowerings (Triton, Mosaic TPU) and the interpreter
accept: explicit float32 accumulation, one operand dtype per matmul, activations with their
derivatives written out (no jax.grad inside a kernel body).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.extend.core import primitives as jex_primitives


def dot(x, y, compute_dtype, dims, batch=((), ())):
  """dot_general (contracting `dims`, batching `batch`) with both operands in the compute dtype,
  accumulated in float32 (or wider). float32 compute is true float32 (HIGHEST: no TF32 rounding
  on GPU)."""
  acc = jnp.promote_types(compute_dtype, jnp.float32)
  precision = (jax.lax.Precision.HIGHEST if jnp.dtype(compute_dtype) == jnp.dtype(acc)
               else jax.lax.Precision.DEFAULT)
  return jax.lax.dot_general(x.astype(compute_dtype), y.astype(compute_dtype), (dims, batch),
                             precision=precision, preferred_element_type=acc)


_NN, _NT = ((1,), (0,)), ((1,), (1,))


def mm(x, y, compute_dtype, transpose_y=False):
  """x @ y (or x @ y^T) in the compute dtype, accumulated in float32+."""
  return dot(x, y, compute_dtype, _NT if transpose_y else _NN)


def one_dtype_per_matmul(fn):
  """fn, evaluated with every matmul's operands cast to the narrower of their two dtypes.

  Autodiff transposes a bf16 x bf16 -> float32 matmul into float32-cotangent x bf16 matmuls;
  the GPU (Triton) lowering needs one operand dtype. Rounding the cotangent to the compute dtype
  is what the forward does to its own operands. A no-op when the compute dtype is float32+.
  """
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs = _eval_jaxpr(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)
  return wrapped


def _eval_jaxpr(jaxpr, consts, args):
  env = {}
  read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
  for var, val in list(zip(jaxpr.constvars, consts)) + list(zip(jaxpr.invars, args)):
    env[var] = val
  for eqn in jaxpr.eqns:
    values = [read(v) for v in eqn.invars]
    if eqn.primitive is jex_primitives.dot_general_p and values[0].dtype != values[1].dtype:
      narrow = min((x.dtype for x in values), key=lambda dt: jnp.dtype(dt).itemsize)
      values = [x.astype(narrow) for x in values]
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = params if isinstance(params, tuple) else ((), params)  # older jax: a pair
    outs = eqn.primitive.bind(*subfuns, *values, **params)
    for var, val in zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]):
      env[var] = val
  return [read(v) for v in jaxpr.outvars]


def act_and_grad(name: str, z):
  """(act(z), act'(z)) written out, so the kernel holds no jax.grad."""
  if name == "gelu":   # tanh approximation, as jax.nn.gelu's default
    c = 0.7978845608028654
    inner = c * (z + 0.044715 * z * z * z)
    th = jnp.tanh(inner)
    dinner = c * (1.0 + 3 * 0.044715 * z * z)
    return 0.5 * z * (1.0 + th), 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * dinner
  if name == "silu":
    s = jax.nn.sigmoid(z)
    return z * s, s * (1.0 + z * (1.0 - s))
  if name == "relu":
    return jnp.maximum(z, 0.0), jnp.where(z > 0, 1.0, 0.0).astype(z.dtype)
  if name == "tanh":
    t = jnp.tanh(z)
    return t, 1.0 - t * t
  raise ValueError(f"activation={name!r} has no kernel derivative")


def act_grad_and_curvature(name: str, z):
  """(act(z), act'(z), act''(z)) written out: the reverse walk of an mlp memory differentiates
  the keys' backward pass (D = (W2^T E) * act'(Z)) once more."""
  if name == "gelu":   # u = c (z + k z^3); act = z (1 + tanh u) / 2
    c, k = 0.7978845608028654, 0.044715
    th = jnp.tanh(c * (z + k * z * z * z))
    sech2 = 1.0 - th * th
    du = c * (1.0 + 3 * k * z * z)
    d2u = 6 * c * k * z
    return (0.5 * z * (1.0 + th), 0.5 * (1.0 + th) + 0.5 * z * sech2 * du,
            sech2 * (du + 0.5 * z * (d2u - 2.0 * th * du * du)))
  if name == "silu":
    s = jax.nn.sigmoid(z)
    return z * s, s * (1.0 + z * (1.0 - s)), s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
  if name == "relu":
    return (*act_and_grad(name, z), jnp.zeros_like(z))
  if name == "tanh":
    t = jnp.tanh(z)
    return t, 1.0 - t * t, -2.0 * t * (1.0 - t * t)
  raise ValueError(f"activation={name!r} has no kernel derivative")


_TN = ((0,), (0,))
LAYOUTS = ("tokens", "features")


class ChunkLayout:
  """The matmuls of a chunk step for one layout of its activations.

  "tokens":   an activation is [C, width]; the chunk's C tokens are every matmul's M dimension
              (16 rows at C = 16: Triton's mma.sync tiles).
  "features": an activation is [width, C]; the feature width (64-256) is M and the tokens are N
              (the shape Hopper's 64-row wgmma takes). Per-token coefficients are then [1, C]
              rows and the score matrix is stored transposed ([j, t]).
  The same math either way: W is [out, in] in both, and every product below is the same sum.
  """

  def __init__(self, name: str, compute_dtype):
    if name not in LAYOUTS:
      raise ValueError(f"layout={name!r} is unknown; expected one of {LAYOUTS}")
    self.tokens = name == "tokens"
    self.cd = compute_dtype

  def apply(self, w, x):
    """A layer's pre-activation x W^T."""
    return mm(x, w, self.cd, transpose_y=True) if self.tokens else mm(w, x, self.cd)

  def apply_transposed(self, w, delta):
    """The cotangent pulled back through a layer: delta W."""
    return mm(delta, w, self.cd) if self.tokens else dot(w, delta, self.cd, _TN)

  def scores(self, x, a):
    """x_t . a_j for reader t and key j: [t, j] (tokens) or [j, t] (features)."""
    return mm(x, a, self.cd, transpose_y=True) if self.tokens else dot(a, x, self.cd, _TN)

  def mix(self, scores, delta):
    """sum_j scores[t, j] delta_j for every reader t."""
    return mm(scores, delta, self.cd) if self.tokens else mm(delta, scores, self.cd)

  def outer(self, u, a):
    """sum_j u_j a_j^T: [out, in]."""
    return mm(u.T, a, self.cd) if self.tokens else mm(u, a, self.cd, transpose_y=True)
