"""Titans MAC, memory as context (SPEC §3; Titans §4.1): "mac:<memory>", one token mixer.

The sequence is cut into segments of S = the attention window (the last may be shorter). For
segment s, with x_s its S inputs and M the memory state after every segment before s:

    q_i   = the memory layer's query of x_i (its q projection, conv over the x stream, SiLU, L2)
    h_i   = the memory layer's output head (norm, gate by x_i, projection) of f(M; q_i)
                                                       retrieval: a read, no update, [S, d_model]
    y_s   = attention over [persistent ‖ h ‖ x_s]: the query of x_i sees every persistent token
            and h_j, x_j for j <= i (h_j is made from x_j, so j > i would leak); RoPE positions
            are offsets in the segment, for h and x alike; nothing of earlier segments is seen
            (they reach the segment through the memory only)
    r, M' = MemoryLayer.extend(y_s, memory cache): the memory, from M, updated with keys and
            values of y_s and read with queries of y_s (its own rule: per-token cumulative reads
            for Titans), in parallel form
    o_s   = RMSNorm(y_s) * sigmoid(RMSNorm(r))           the gate of MAG

The update comes after attention and is taken on the attention output (tests/layers/test_mac.py
checks the order). <memory> is any memory-layer kind (titans, tnt, ...); S must be a multiple of
its alignment() (every chunk and shard starts with a segment). With a TNT memory, "the state
before the segment" is its global memory's: the local memories reset at every shard start, and
every segment starts a shard, so before a segment they hold nothing but their learned W_init
(with an empty Q-K projection); retrieval therefore reads the global memory alone, the one that
carries the past, and the update and read of y_s run the whole TNT memory.

One function, `_segment`, runs tokens within one segment from the cache; the parallel forward is
a lax.scan of it over whole segments (one compile) from the initial cache, and streaming /
decoding (`extend`) the same scan, or one token. The cache: the memory layer's cache, the global
memory's weights at the segment start (retrieval), the x stream's q-conv history, and the
segment's attention keys and values so far ([h ‖ x] slots with their offsets, -1 for empty).
There is no context-parallel form (segments run one after another through the memory).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from tnt_jax.layers.attention import Attention, AttentionConfig, attend, init_kv_ring
from tnt_jax.layers.configs import MemoryLayerConfig
from tnt_jax.layers.flops import memory_layer_flops
from tnt_jax.layers.memory_layer import MemoryLayer
from tnt_jax.layers.norms import RMSNorm, l2_normalize
from tnt_jax.memory.models import plain_dense
from tnt_jax.ops.decode import alignment as memory_alignment

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MACConfig:
  memory: MemoryLayerConfig
  attention: AttentionConfig      # its window is the segment length S
  kind: ClassVar[str] = "mac"

  def __post_init__(self):
    if self.memory.d_model != self.attention.d_model:
      raise ValueError(f"hybrid mac: memory d_model={self.memory.d_model} and attention "
                       f"d_model={self.attention.d_model} differ")
    window = self.attention.window
    if window is None:
      raise ValueError("hybrid mac: the segment length is the attention window, which is None "
                       "(full attention); give the attention a window")
    align = memory_alignment(self.memory.memory_config())
    if window % align:
      raise ValueError(f"hybrid mac: the segment length window={window} must be a multiple of "
                       f"the {self.memory.kind} memory's alignment()={align} (the lcm of its "
                       "chunk sizes and shard lengths), so that every segment's memory update "
                       "starts where the memory's chunks and shards begin")

  @property
  def segment(self) -> int:
    return self.attention.window

  def parts(self) -> tuple[MemoryLayerConfig, AttentionConfig]:
    return self.memory, self.attention

  def flops(self, batch: int, length: int) -> float:
    """Forward matmul FLOPs (as models/flops.py counts them): the memory layer on y, the
    attention's projections (q, gate, out of x; k, v of x and of h), its scores and values over
    the 2S + P keys of each segment, the retrieval (q of x, a read of the memory, the output
    head of h) and the persistent tokens' k, v."""
    a, m = self.attention, self.memory
    tokens, d = batch * length, a.d_model
    inner = a.num_heads * a.head_dim
    keys = 2 * min(self.segment, length) + a.persistent_tokens
    segments = -(-length // self.segment)
    shapes = m.memory_config().global_memory.model.layer_shapes(m.head_dim).values()
    read_macs = m.num_heads * sum(o * i for o, i in shapes)
    fwd = memory_layer_flops(m, batch, length, backward=False)
    fwd += 2.0 * tokens * 7 * d * inner + 4.0 * tokens * keys * inner
    fwd += 2.0 * tokens * (d * m.inner_dim + read_macs + 2 * d * m.inner_dim)
    fwd += 2.0 * batch * segments * 2 * a.persistent_tokens * d * inner
    return fwd


def _tree_where(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


class MACMixer(nnx.Module):

  def __init__(self, config: MACConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    self.dtype = dtype
    self.memory = MemoryLayer(config.memory, rngs=rngs, dtype=dtype)
    self.attention = Attention(config.attention, rngs=rngs, dtype=dtype)
    self.attention_norm = RMSNorm(config.attention.d_model)
    self.memory_norm = RMSNorm(config.memory.d_model)

  # --- the pieces of one segment ---

  def _retrieval_queries(self, x_BxLxD: Array, history: Array) -> tuple[Array, Array]:
    """The memory layer's queries of x (its q projection and conv, over the x stream)."""
    m = self.memory
    y, history = m.q_conv.extend(m.q_proj(x_BxLxD), history)
    b, l, _ = x_BxLxD.shape
    q = jax.nn.silu(y).reshape(b, l, m.config.num_heads, m.config.head_dim)
    return l2_normalize(q), history

  def _retrieve(self, weights: dict, q_BxLxHxD: Array, x_BxLxD: Array) -> Array:
    """h = the memory layer's output head of f(weights; q): the global memory read with its
    weights as given (leaves [B, H, ...]), no update. [B, L, d_model]."""
    model = self.memory.tnt.global_memory.model
    acc = jax.tree.leaves(weights)[0].dtype
    slow = jax.tree.map(lambda p: p.astype(acc), self.memory.memories[0].slow_params())
    read = lambda w, s, q: model.apply(plain_dense(w), s, q)
    per_batch = jax.vmap(jax.vmap(read), in_axes=(0, None, 0))
    o = per_batch(weights, slow, jnp.swapaxes(q_BxLxHxD, 1, 2).astype(acc))
    return self.memory.output(jnp.swapaxes(o, 1, 2).astype(self.dtype), x_BxLxD)

  def _gate(self, attended: Array, remembered: Array) -> Array:
    return self.attention_norm(attended) * jax.nn.sigmoid(self.memory_norm(remembered))

  def _segment(self, x_BxLxD: Array, cache: dict) -> tuple[Array, dict]:
    """L tokens of one segment (from offset position % S, not past its end) -> outputs, cache."""
    s, length = self.config.segment, x_BxLxD.shape[1]
    position = cache["position"]
    offset = position % s
    start = offset == 0
    memory_cache = cache["memory"]
    # A segment starts: retrieval reads the memory as it is now; the attention forgets.
    weights = _tree_where(start, memory_cache["memory"].global_carry["w"],
                          cache["retrieval_weights"])
    ring = cache["attention"]
    slot_pos = jnp.where(start, -1, ring["slot_pos"])

    q_ret, history = self._retrieval_queries(x_BxLxD, cache["retrieval_conv"])
    h = self._retrieve(weights, q_ret, x_BxLxD)
    positions = offset + jnp.arange(length, dtype=jnp.int32)
    q = self.attention.queries(x_BxLxD, positions)
    k_h, v_h = self.attention.keys_values(h, positions)
    k_x, v_x = self.attention.keys_values(x_BxLxD, positions)
    write = lambda buf, new_h, new_x: jax.lax.dynamic_update_slice_in_dim(
        jax.lax.dynamic_update_slice_in_dim(buf, new_h.astype(buf.dtype), offset, axis=1),
        new_x.astype(buf.dtype), s + offset, axis=1)
    ring = {"k": write(ring["k"], k_h, k_x), "v": write(ring["v"], v_h, v_x),
            "slot_pos": write(slot_pos[None], positions[None], positions[None])[0]}
    o = attend(q, positions, ring["k"], ring["v"], ring["slot_pos"], None,
               self.attention.persistent_kv())
    y = self.attention.output(o, x_BxLxD)

    remembered, memory_cache = self.memory.extend(y, memory_cache)
    out = self._gate(y, remembered)
    return out, {"memory": memory_cache, "retrieval_weights": weights,
                 "retrieval_conv": history, "attention": ring, "position": position + length}

  def _run(self, x_BxTxD: Array, cache: dict, collect_states: bool = False):
    """T tokens from a segment start: a scan over whole segments, then the shorter rest.
    collect_states: also the memory cache before each segment, stacked [segments, ...]."""
    s = self.config.segment
    b, t, d = x_BxTxD.shape
    n, rest = divmod(t, s)
    outs, states = [], []
    if n:
      def body(cache, x_seg):
        out, new_cache = self._segment(x_seg, cache)
        return new_cache, (out, cache["memory"] if collect_states else None)

      xs = jnp.swapaxes(x_BxTxD[:, :n * s].reshape(b, n, s, d), 0, 1)
      cache, (out, before) = jax.lax.scan(body, cache, xs)
      outs.append(jnp.swapaxes(out, 0, 1).reshape(b, n * s, d))
      states.append(before)
    if rest:
      states.append(jax.tree.map(lambda y: y[None], cache["memory"]))
      out, cache = self._segment(x_BxTxD[:, n * s:], cache)
      outs.append(out)
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    if collect_states:
      states = jax.tree.map(lambda *ys: jnp.concatenate(ys), *states)
      return out, cache, states
    return out, cache

  # --- the parallel forward ---

  def __call__(self, x_BxTxD: Array, context_axis: str | None = None) -> Array:
    if context_axis is not None:
      raise ValueError("Titans MAC has no context-parallel form: its segments run one after "
                       "another through the memory (use mesh.context=1)")
    x = x_BxTxD.astype(self.dtype)
    return self._run(x, self.init_cache(x.shape[0]))[0]

  def segment_states(self, x_BxTxD: Array) -> tuple[Array, dict]:
    """(outputs, the memory layer's cache before each segment, leaves [segments, ...]):
    state s must not depend on x at positions >= s * S (tests)."""
    x = x_BxTxD.astype(self.dtype)
    out, _, states = self._run(x, self.init_cache(x.shape[0]), collect_states=True)
    return out, states

  # --- streaming and decoding ---

  def init_cache(self, batch: int, max_length: int | None = None) -> dict:
    del max_length   # the cache holds one segment
    memory = self.memory.init_cache(batch)
    a = self.config.attention
    return {"memory": memory,
            "retrieval_weights": jax.tree.map(jnp.copy, memory["memory"].global_carry["w"]),
            "retrieval_conv": self.memory.q_conv.empty_history(batch, self.dtype),
            "attention": init_kv_ring(batch, 2 * self.config.segment, a.num_heads, a.head_dim,
                                      self.dtype),
            "position": jnp.zeros((), jnp.int32)}

  def alignment(self) -> int:
    """Multi-token extends start at a segment start (a multiple of the memory's alignment)."""
    return self.config.segment

  def extend(self, x_BxTxD: Array, cache: dict) -> tuple[Array, dict]:
    """T more tokens: one token anywhere, several from a multiple of `alignment()`."""
    return self._run(x_BxTxD.astype(self.dtype), cache)
