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

`TokenRule.step` is that rule for one token; the reference scans it over a sequence and
recurrent decoding (ops/decode.py) applies it once per generated token, so decoding follows the
reference by construction.
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


class TokenRule:
  """One head's memory, one token at a time. The carry is a dict:

    w        the fast weights W (lact: the chunk-start weights, updated after a chunk's end)
    m        momentum (titans: S; lact: m) or None
    w_start  gd/titans: W_{xi(t)}, the state the chunk's gradients are taken at
    g, eta_sum, count   lact: the chunk's accumulated theta-weighted gradient and eta
    proj     the Q-K projection matrix P (TNT locals; zeros otherwise)

  TNT local memories (SPEC §2): with `shard_length`, the state (and momentum) is reset to
  `reset_state` at every t with t % shard_length == 0; with `qk_projection`, reads use P_t q_t
  with P_t = sum over the shard so far of k k^T / ||k||^2.
  """

  def __init__(self, config: MemoryConfig, slow: dict, *, reset_state: MemoryState | None = None,
               shard_length: int | None = None, qk_projection: bool = False):
    self.config, self.slow = config, slow
    self.reset_state = reset_state
    self.shard_length, self.qk_projection = shard_length, qk_projection
    self.loss = get_loss(config.loss)

  def f(self, w, x):
    return self.config.model.apply(plain_dense(w), self.slow, x)

  def initial_carry(self, weights: dict, momentum, head_dim: int, dtype) -> dict:
    carry = {"w": weights, "m": momentum,
             "proj": jnp.zeros((head_dim, head_dim), dtype)}
    if self.config.rule.kind == "lact":
      carry.update(g=jax.tree.map(jnp.zeros_like, weights), eta_sum=jnp.zeros((), dtype),
                   count=jnp.zeros((), jnp.int32))
    else:
      carry["w_start"] = weights
    return carry

  def _shard_start(self, t, carry):
    """Reset at the start of each local shard (no-op for a global memory)."""
    if self.shard_length is None:
      return carry
    reset = t % self.shard_length == 0
    carry = dict(carry, w=_tree_where(reset, self.reset_state.weights, carry["w"]),
                 m=_tree_where(reset, self.reset_state.momentum, carry["m"]),
                 proj=jnp.where(reset, jnp.zeros_like(carry["proj"]), carry["proj"]))
    if "g" in carry:   # shards end on chunk ends, so g is already zero; reset it all the same
      carry.update(g=_tree_where(reset, jax.tree.map(jnp.zeros_like, carry["g"]), carry["g"]),
                   eta_sum=jnp.where(reset, 0.0, carry["eta_sum"]),
                   count=jnp.where(reset, 0, carry["count"]))
    return carry

  def _query(self, carry, q_t, k_t):
    if not self.qk_projection:
      return q_t, carry
    proj = carry["proj"] + jnp.outer(k_t, k_t) / jnp.sum(k_t * k_t)
    return proj @ q_t, dict(carry, proj=proj)

  def _token_grad(self, w, k_t, v_t):
    return jax.grad(lambda w_: self.loss(self.f(w_, k_t), v_t))(w)

  def step(self, carry: dict, t, q_t, k_t, v_t, theta_t, eta_t=0.0, alpha_t=0.0,
           end_of_call=False) -> tuple[dict, Array]:
    """Token t (its position in the stream) -> (next carry, o_t). end_of_call: lact applies a
    partial chunk's update after this token (the end of a reference call)."""
    chunk, rule = self.config.chunk_size, self.config.rule
    carry = self._shard_start(t, carry)
    q_t, carry = self._query(carry, q_t, k_t)
    if rule.kind == "lact":
      w, m = carry["w"], carry["m"]
      o_t = self.f(w, q_t)
      g = _add(carry["g"], _scale(self._token_grad(w, k_t, v_t), theta_t))
      eta_sum, count = carry["eta_sum"] + eta_t, carry["count"] + 1
      w_new, m_new = lact_update(w, m, g, eta_sum / count, rule)
      last = (t % chunk == chunk - 1) | end_of_call
      carry = dict(carry, w=_tree_where(last, w_new, w), m=_tree_where(last, m_new, m),
                   g=_tree_where(last, jax.tree.map(jnp.zeros_like, g), g),
                   eta_sum=jnp.where(last, 0.0, eta_sum), count=jnp.where(last, 0, count))
      return carry, o_t
    w, s = carry["w"], carry["m"]
    w_start = _tree_where(t % chunk == 0, w, carry["w_start"])
    u = self._token_grad(w_start, k_t, v_t)
    if rule.kind == "titans":
      s = _add(_scale(s, eta_t), _scale(u, -theta_t))
      w = _add(_scale(w, 1.0 - alpha_t), s)
    else:
      w = _add(w, _scale(u, -theta_t))
    read_w = w if self.config.read == "cumulative" else w_start
    return dict(carry, w=w, m=s, w_start=w_start), self.f(read_w, q_t)


def reference_single_head(q_TxD, k_TxD, v_TxD, theta_T, eta_T, alpha_T, weights, momentum,
                          slow, config: MemoryConfig, shard_length=None, qk_projection=False):
  """One head, one sequence. Returns (o_TxD, (weights, momentum)); see TokenRule for the
  local-memory options (shards reset to the given initial state)."""
  num_tokens = q_TxD.shape[0]
  rule = TokenRule(config, slow, reset_state=MemoryState(weights, momentum),
                   shard_length=shard_length, qk_projection=qk_projection)
  zeros = jnp.zeros_like(theta_T)

  def step(carry, inputs):
    t, q_t, k_t, v_t, theta_t, eta_t, alpha_t = inputs
    return rule.step(carry, t, q_t, k_t, v_t, theta_t, eta_t, alpha_t,
                     end_of_call=t == num_tokens - 1)

  inputs = (jnp.arange(num_tokens), q_TxD, k_TxD, v_TxD, theta_T,
            zeros if eta_T is None else eta_T, zeros if alpha_T is None else alpha_T)
  carry0 = rule.initial_carry(weights, momentum, q_TxD.shape[-1], q_TxD.dtype)
  carry, o = jax.lax.scan(step, carry0, inputs)
  return o, (carry["w"], carry["m"])


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
