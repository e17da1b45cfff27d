"""The token-level reference of SPEC §1: a literal loop over tokens with jax.grad.

Written to be read, not to be fast. Every fast path (chunkwise op, TNT op, kernels, decoding) is
tested against it. One head at a time; `reference_memory` vmaps over batch and heads.

For token t of a call (positions counted from the call's first token), C = chunk_size:
  u_t = grad_W l(W_{xi(t)}; k_t, v_t)    W_{xi(t)}: state after every token before t's chunk
  gd:     W_t = W_{t-1} - theta_t u_t
  titans: S_t = eta_t S_{t-1} - theta_t u_t;  W_t = (1 - alpha_t) W_{t-1} + S_t
  lact:   g += theta_t u_t; after the chunk's last token (or the call's last token):
          W, m = lact_update(W, m, g, beta = mean of the chunk's eta)
  cumulative read: o_t = f(W_t; q_t)      chunk-start read: o_t = f(W_{xi(t)}; q_t)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tnt_jax.memory.config import MemoryConfig, accumulation_dtype
from tnt_jax.memory.losses import get_loss
from tnt_jax.memory.models import plain_dense
from tnt_jax.memory.rules import Gates, MemoryState, lact_update

Array = jax.Array


def _tree_where(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _scale(tree, s):
  return jax.tree.map(lambda x: s * x, tree)


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def reference_single_head(q_TxD, k_TxD, v_TxD, theta_T, eta_T, alpha_T, weights, momentum,
                          slow, config: MemoryConfig, shard_length=None, qk_projection=False):
  """One head, one sequence. Returns (o_TxD, (weights, momentum)).

  TNT local memories (SPEC §2): with `shard_length`, the state (and momentum) is reset to the
  given initial one at every t with t % shard_length == 0; with `qk_projection`, reads use
  P_t q_t with P_t = sum over the shard so far of k k^T / ||k||^2.
  """
  model, rule, chunk = config.model, config.rule, config.chunk_size
  loss = get_loss(config.loss)
  num_tokens = q_TxD.shape[0]
  init_w, init_m = weights, momentum
  head_dim = q_TxD.shape[-1]

  def f(w, x):
    return model.apply(plain_dense(w), slow, x)

  def shard_start(t, w, m, proj):
    """Reset at the start of each local shard (no-op for a global memory)."""
    if shard_length is None:
      return w, m, proj
    reset = t % shard_length == 0
    return (_tree_where(reset, init_w, w), _tree_where(reset, init_m, m),
            jnp.where(reset, jnp.zeros_like(proj), proj))

  def query(proj, q_t, k_t):
    if not qk_projection:
      return q_t, proj
    proj = proj + jnp.outer(k_t, k_t) / jnp.sum(k_t * k_t)
    return proj @ q_t, proj

  def token_grad(w, k_t, v_t):
    return jax.grad(lambda w_: loss(f(w_, k_t), v_t))(w)

  steps = jnp.arange(num_tokens)
  if rule.kind in ("gd", "titans"):
    def step(carry, inputs):
      w, s, w_chunk_start, proj = carry
      t, q_t, k_t, v_t, theta_t, eta_t, alpha_t = inputs
      w, s, proj = shard_start(t, w, s, proj)
      q_t, proj = query(proj, q_t, k_t)
      w_chunk_start = _tree_where(t % chunk == 0, w, w_chunk_start)
      u = token_grad(w_chunk_start, k_t, v_t)
      if rule.kind == "titans":
        s = _add(_scale(s, eta_t), _scale(u, -theta_t))
        w = _add(_scale(w, 1.0 - alpha_t), s)
      else:
        w = _add(w, _scale(u, -theta_t))
      read_w = w if config.read == "cumulative" else w_chunk_start
      return (w, s, w_chunk_start, proj), f(read_w, q_t)

    zeros = jnp.zeros_like(theta_T)
    inputs = (steps, q_TxD, k_TxD, v_TxD, theta_T,
              zeros if eta_T is None else eta_T, zeros if alpha_T is None else alpha_T)
    proj0 = jnp.zeros((head_dim, head_dim), q_TxD.dtype)
    (w, s, _, _), o = jax.lax.scan(step, (weights, momentum, weights, proj0), inputs)
    return o, (w, s)

  # lact: accumulate the chunk's gradient at the chunk-start state, update after its last token.
  def step(carry, inputs):
    w, m, g, eta_sum, count, proj = carry
    t, q_t, k_t, v_t, theta_t, eta_t = inputs
    w, m, proj = shard_start(t, w, m, proj)   # shards end on chunk ends: g is already zero
    q_t, proj = query(proj, q_t, k_t)
    o_t = f(w, q_t)
    g = _add(g, _scale(token_grad(w, k_t, v_t), theta_t))
    eta_sum, count = eta_sum + eta_t, count + 1
    w_new, m_new = lact_update(w, m, g, eta_sum / count, rule)
    last = (t % chunk == chunk - 1) | (t == num_tokens - 1)
    w = _tree_where(last, w_new, w)
    m = _tree_where(last, m_new, m)
    g = _tree_where(last, jax.tree.map(jnp.zeros_like, g), g)
    eta_sum, count = jnp.where(last, 0.0, eta_sum), jnp.where(last, 0, count)
    return (w, m, g, eta_sum, count, proj), o_t

  eta_in = jnp.zeros_like(theta_T) if eta_T is None else eta_T
  carry0 = (weights, momentum, jax.tree.map(jnp.zeros_like, weights),
            jnp.zeros((), theta_T.dtype), jnp.zeros((), jnp.int32),
            jnp.zeros((head_dim, head_dim), q_TxD.dtype))
  (w, m, _, _, _, _), o = jax.lax.scan(
      step, carry0, (steps, q_TxD, k_TxD, v_TxD, theta_T, eta_in))
  return o, (w, m)


def reference_memory(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, gates: Gates,
                     state: MemoryState, slow: dict, config: MemoryConfig, *,
                     shard_length=None, qk_projection=False):
  """Batched reference. State leaves are [B, H, ...]; slow leaves [H, ...]; gates [B, T, H].

  Computes in float32 (float64 under x64) whatever the input dtype; returns outputs in the
  input dtype and the state in float32/float64.
  """
  acc = accumulation_dtype(q_BxTxHxD.dtype, state)
  to_bhtd = lambda x: jnp.swapaxes(x, 1, 2).astype(acc)
  to_bht = lambda g: None if g is None else jnp.swapaxes(g, 1, 2).astype(acc)
  state = jax.tree.map(lambda x: x.astype(acc), state)
  slow = jax.tree.map(lambda x: x.astype(acc), slow)

  def per_head(q, k, v, th, et, al, w, m, sl):
    return reference_single_head(q, k, v, th, et, al, w, m, sl, config, shard_length,
                                 qk_projection)

  # Gates that are None stay None through vmap (in_axes None for them).
  eta, alpha = to_bht(gates.eta), to_bht(gates.alpha)
  head_axes = (0, 0, 0, 0, None if eta is None else 0, None if alpha is None else 0, 0,
               None if state.momentum is None else 0, 0)
  batch_axes = head_axes[:-1] + (None,)
  fn = jax.vmap(jax.vmap(per_head, in_axes=head_axes), in_axes=batch_axes)
  o_BxHxTxD, (w, m) = fn(to_bhtd(q_BxTxHxD), to_bhtd(k_BxTxHxD), to_bhtd(v_BxTxHxD),
                         to_bht(gates.theta), eta, alpha, state.weights, state.momentum, slow)
  return jnp.swapaxes(o_BxHxTxD, 1, 2).astype(q_BxTxHxD.dtype), MemoryState(w, m)
