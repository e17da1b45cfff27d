"""The memory layer: the token mixer of Titans, TTT, LaCT and TNT models (nnx).

    x [B, T, d_model]
      -> q, k, v = SiLU(CausalConv(x W_{q,k,v}))       per head; q, k then L2-normalised
      -> per memory m: theta = config.theta_ceiling(m) * sigmoid(x W_theta + b),
         eta = max_momentum * sigmoid(.),
         alpha = sigmoid(...)
      -> o = tnt_op(q, k, v, gates, ...)                 global memory + sum of local memories
      -> HeadRMSNorm(o) * SiLU(x W_gate) -> W_out        [B, T, d_model]

With `shared_window` (LaCT's hybrid) the same q, k, v also feed causal sliding-window attention:
q and k are RMS-normalised per head with learned scales (they are unit vectors for the memory,
which would leave softmax scores within +-1/sqrt(D)), rotated by RoPE, and the attention output
is added after its own HeadRMSNorm: HeadRMSNorm(o) + HeadRMSNorm(attention) before the gate.

The conv comes before the SiLU (as in Mamba and Titans' code) so the SiLU sees the mixed
features. Parameters are float32; the layer computes in `dtype` (e.g. bfloat16) while the memory
state and its accumulations stay float32 inside the op. Which memories run is the config's
`memory_config()` (a TNTConfig); the learned initial fast weights W_init of every memory are
parameters of this layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from tnt_jax.layers.attention import (attend, attend_and_write, causal_attention,
                                      init_kv_ring, rope, windowed_halo)
from tnt_jax.layers.configs import MemoryLayerConfig
from tnt_jax.layers.conv import CausalDepthwiseConv
from tnt_jax.layers.norms import HeadRMSNorm, l2_normalize
from tnt_jax.memory.config import MemoryConfig
from tnt_jax.memory.rules import Gates
from tnt_jax.ops.decode import (alignment, carry_state, init_decode_state, tnt_decode_step,
                               tnt_prefill)
from tnt_jax.ops.tnt import tnt_op
from tnt_jax.parallel.context import previous_tokens, tnt_op_in_context

Array = jax.Array
GATE_ORDER = ("theta", "eta", "alpha")


class MemoryParams(nnx.Module):
  """One memory's outer parameters: its gate projection, learned W_init and slow params."""

  def __init__(self, memory: MemoryConfig, config: MemoryLayerConfig, *, rngs: nnx.Rngs,
               dtype, param_dtype):
    h, hd = config.num_heads, config.head_dim
    self.gate_names = memory.rule.required_gates()
    self.num_heads = h
    self.theta_ceiling = config.theta_ceiling(memory)
    self.max_momentum = config.max_momentum
    biases = {"theta": config.theta_bias, "eta": config.eta_bias, "alpha": config.alpha_bias}
    self.gate_proj = nnx.Linear(
        config.d_model, h * len(self.gate_names), use_bias=True, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs,
        bias_init=lambda key, shape, dt: jnp.repeat(
            jnp.asarray([biases[n] for n in self.gate_names], dt), h))
    init = memory.model.init_fast_weights(rngs.params(), h, hd, param_dtype)
    self.initial_weights = nnx.data(jax.tree.map(nnx.Param, init))
    self.slow = nnx.data(jax.tree.map(nnx.Param, memory.model.init_slow_params(h, hd,
                                                                                param_dtype)))

  def gates(self, x_BxTxD: Array) -> Gates:
    b, t, _ = x_BxTxD.shape
    logits = self.gate_proj(x_BxTxD).astype(jnp.float32)
    logits = logits.reshape(b, t, len(self.gate_names), self.num_heads)
    values = {n: jax.nn.sigmoid(logits[:, :, i]) for i, n in enumerate(self.gate_names)}
    values["theta"] = self.theta_ceiling * values["theta"]
    if "eta" in values:
      values["eta"] = self.max_momentum * values["eta"]
    return Gates(*(values.get(n) for n in GATE_ORDER))

  def weights(self) -> dict:
    return jax.tree.map(lambda p: p[...], self.initial_weights,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))

  def slow_params(self) -> dict:
    return jax.tree.map(lambda p: p[...], self.slow,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


class MemoryLayer(nnx.Module):
  """A deep test-time memory token mixer; `config` is any MemoryLayerConfig kind."""

  def __init__(self, config: MemoryLayerConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    self.tnt = config.memory_config()
    self.dtype = dtype
    d, inner = config.d_model, config.inner_dim
    linear = lambda out_dim: nnx.Linear(d, out_dim, use_bias=False, dtype=dtype,
                                        param_dtype=param_dtype, rngs=rngs)
    conv = lambda: CausalDepthwiseConv(inner, config.conv_width, rngs=rngs,
                                       param_dtype=param_dtype)
    self.q_proj, self.k_proj, self.v_proj = linear(inner), linear(inner), linear(inner)
    self.q_conv, self.k_conv, self.v_conv = conv(), conv(), conv()
    memories = [self.tnt.global_memory] + [m.memory for m in self.tnt.local_memories]
    self.memories = nnx.List([MemoryParams(m, config, rngs=rngs, dtype=dtype,
                                           param_dtype=param_dtype) for m in memories])
    self.out_norm = HeadRMSNorm(config.num_heads, config.head_dim, param_dtype=param_dtype)
    if config.shared_window is not None:
      head_norm = lambda: HeadRMSNorm(config.num_heads, config.head_dim, param_dtype=param_dtype)
      self.attention_q_norm, self.attention_k_norm = head_norm(), head_norm()
      self.attention_out_norm = head_norm()
    self.gate_proj = linear(inner)
    self.out_proj = nnx.Linear(inner, d, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)

  def qkv(self, x_BxTxD: Array, history: dict | None = None, halo_axis: str | None = None):
    """q, k, v [B, T, H, D]; with `history` (the conv inputs before x) also the next history.
    halo_axis: context parallelism: the conv inputs before x come from the previous device."""
    b, t, _ = x_BxTxD.shape
    heads = lambda y: y.reshape(b, t, self.config.num_heads, self.config.head_dim)
    out, new_history = {}, {}
    for name, proj, conv in (("q", self.q_proj, self.q_conv), ("k", self.k_proj, self.k_conv),
                             ("v", self.v_proj, self.v_conv)):
      x = proj(x_BxTxD)
      if halo_axis is not None:
        y, _ = conv.extend(x, previous_tokens(x, conv.width - 1, halo_axis))
      elif history is None:
        y = conv(x)
      else:
        y, new_history[name] = conv.extend(x, history[name])
      out[name] = heads(jax.nn.silu(y))
    q, k = l2_normalize(out["q"]), l2_normalize(out["k"])
    if history is None:
      return q, k, out["v"]
    return q, k, out["v"], new_history

  def _memory_inputs(self, x):
    return ([m.gates(x) for m in self.memories], [m.weights() for m in self.memories],
            [m.slow_params() for m in self.memories])

  def output(self, o_BxTxHxD, x, attended_BxTxHxD=None):
    """Per-head output norm (+ the shared attention's), SiLU gate by x, projection."""
    b, t, _ = x.shape
    o = self.out_norm(o_BxTxHxD.astype(self.dtype))
    if attended_BxTxHxD is not None:
      o = o + self.attention_out_norm(attended_BxTxHxD)
    o = o.reshape(b, t, self.config.inner_dim)
    return self.out_proj(o * jax.nn.silu(self.gate_proj(x)))

  # --- LaCT's hybrid: sliding-window attention over the memory's own q, k, v ---

  def _attention_qk(self, q, k, positions_T):
    base = 10000.0
    return (rope(self.attention_q_norm(q), positions_T, base),
            rope(self.attention_k_norm(k), positions_T, base))

  def _shared_attention(self, q, k, v, context_axis):
    window = self.config.shared_window
    length = q.shape[1]
    if context_axis is not None:
      positions = jax.lax.axis_index(context_axis) * length + jnp.arange(length, dtype=jnp.int32)
      q, k = self._attention_qk(q, k, positions)
      keys, values, key_pos = windowed_halo(k, v, positions, window, context_axis)
      return attend(q, positions, keys, values, key_pos, window)
    q, k = self._attention_qk(q, k, jnp.arange(length, dtype=jnp.int32))
    return causal_attention(q, k, v, window)

  def _check_input(self, x_BxTxD):
    if x_BxTxD.ndim != 3 or x_BxTxD.shape[-1] != self.config.d_model:
      raise ValueError(f"memory layer input must be [batch, time, d_model="
                       f"{self.config.d_model}], got shape {tuple(x_BxTxD.shape)}")

  def __call__(self, x_BxTxD: Array, context_axis: str | None = None) -> Array:
    """context_axis: inside shard_map with the sequence split over that mesh axis (context
    parallelism, tnt_jax/parallel/context.py); x is this device's slice."""
    self._check_input(x_BxTxD)
    x = x_BxTxD.astype(self.dtype)
    q, k, v = self.qkv(x, halo_axis=context_axis)
    gates, weights, slows = self._memory_inputs(x)
    global_state = self.tnt.global_memory.init_state(weights[0], x.shape[0])
    op = tnt_op if context_axis is None else functools.partial(
        tnt_op_in_context, axis=context_axis, global_handoff=self.config.global_handoff)
    o_BxTxHxD, _ = op(q, k, v, gates, global_state, weights[1:], slows, self.tnt,
                      implementation=self.config.implementation, remat=self.config.remat,
                      kernel_blocks=self.config.blocks)
    attended = None
    if self.config.shared_window is not None:
      attended = self._shared_attention(q, k, v, context_axis)
    return self.output(o_BxTxHxD, x, attended)

  # --- streaming and decoding (SPEC §2.2) ---

  def init_cache(self, batch: int) -> dict:
    """The recurrent state before the first token: conv histories and every memory's carry."""
    weights = [m.weights() for m in self.memories]
    history = {name: conv.empty_history(batch, self.dtype)
               for name, conv in (("q", self.q_conv), ("k", self.k_conv), ("v", self.v_conv))}
    state = init_decode_state(self.tnt.global_memory.init_state(weights[0], batch), weights[1:],
                              self.tnt, self.dtype)
    cache = {"conv": history, "memory": state}
    if self.config.shared_window is not None:
      c = self.config
      cache["attention"] = init_kv_ring(batch, c.shared_window, c.num_heads, c.head_dim,
                                        self.dtype)
    return cache

  def alignment(self) -> int:
    """A multi-token `extend` must start at a multiple of this (chunks and shards begin)."""
    return alignment(self.tnt)

  def extend(self, x_BxTxD: Array, cache: dict) -> tuple[Array, dict]:
    """Continue the stream by T tokens: one token takes a decode step (any position); several
    run the parallel form, from a position that is a multiple of `alignment()`."""
    self._check_input(x_BxTxD)
    x = x_BxTxD.astype(self.dtype)
    q, k, v, history = self.qkv(x, cache["conv"])
    gates, weights, slows = self._memory_inputs(x)
    state = cache["memory"]
    if x.shape[1] == 1:
      token = lambda y: y[:, 0]
      o, state = tnt_decode_step(
          token(q), token(k), token(v),
          [Gates(*(None if g is None else token(g) for g in gate)) for gate in gates], state,
          weights[1:], slows, self.tnt)
      o_BxTxHxD = o[:, None]
    else:
      o_BxTxHxD, state = tnt_prefill(
          q, k, v, gates, carry_state(state.global_carry), weights[1:], slows, self.tnt,
          position=state.position, implementation=self.config.implementation,
          kernel_blocks=self.config.blocks)
    cache = dict(cache, conv=history, memory=state)
    attended = None
    if self.config.shared_window is not None:
      positions = cache["memory"].position - x.shape[1] + jnp.arange(x.shape[1], dtype=jnp.int32)
      q, k = self._attention_qk(q, k, positions)
      attended, cache["attention"] = attend_and_write(q, k, v, positions, cache["attention"],
                                                      self.config.shared_window)
    return self.output(o_BxTxHxD, x, attended), cache


def count_params(module: nnx.Module) -> int:
  """Number of trainable scalars (nnx.Param) in a module."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
