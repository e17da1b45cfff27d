"""Causal self-attention (full or sliding-window) with RoPE, the attention token mixer.

Persistent memory tokens (Titans): `persistent_tokens` = P learned vectors [P, d_model], projected
by the layer's own key and value projections without RoPE and visible to every query, in the
parallel, context-parallel and decoding paths. In an LM, `mixer_options={"swa":
{"persistent_tokens": 4}}` gives them to every SWA mixer and to the attention of the Titans hybrids
(MAG, MAL, MAC take the "swa" kind's options). With P = 0 the layer and its parameters are
exactly those of plain attention (old checkpoints load).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tnt_jax.parallel.context import previous_tokens
from tnt_jax.platform import target_platform

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
  """window: None for full causal attention, else each token sees itself and the window - 1
  tokens before it. implementation: "cudnn" (jax.nn.dot_product_attention's fused kernel), "xla"
  (explicit-mask attention in the input's precision, a window in blocks of `window` queries so
  no T x T scores are built; `causal_attention`), or "auto": cuDNN on GPU for 16-bit inputs
  without persistent tokens, XLA elsewhere. persistent_tokens: P learned key/value tokens every
  query sees (Titans' persistent memory); the cuDNN kernel cannot take them."""

  d_model: int
  num_heads: int
  head_dim: int | None = None
  window: int | None = None
  rope_base: float = 10000.0
  implementation: str = "auto"
  persistent_tokens: int = 0

  def __post_init__(self):
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(f"d_model={self.d_model} is not a multiple of num_heads="
                         f"{self.num_heads}; pass head_dim explicitly")
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.window is not None and self.window < 1:
      raise ValueError(f"attention window={self.window} must be >= 1 (or None for full)")
    if self.implementation not in ("auto", "xla", "cudnn"):
      raise ValueError(f"attention implementation={self.implementation!r} must be auto, xla "
                       "or cudnn")
    if (not isinstance(self.persistent_tokens, int) or isinstance(self.persistent_tokens, bool)
        or self.persistent_tokens < 0):
      raise ValueError(f"persistent_tokens={self.persistent_tokens!r} must be an integer >= 0")
    if self.persistent_tokens and self.implementation == "cudnn":
      raise ValueError(f"implementation='cudnn' cannot take persistent_tokens="
                       f"{self.persistent_tokens} (extra keys outside the causal mask): use "
                       "'auto' or 'xla'")


def rope(x_BxTxHxD: Array, positions_T: Array, base: float) -> Array:
  """Rotary position embedding (rotate-half form), in float32 or wider (float64 stays exact)."""
  acc = jnp.promote_types(x_BxTxHxD.dtype, jnp.float32)
  half = x_BxTxHxD.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=acc) / half)
  angles = positions_T.astype(acc)[:, None] * freqs                       # [T, D/2]
  cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
  x1, x2 = jnp.split(x_BxTxHxD.astype(acc), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxD.dtype)


def attend(q_BxTxHxD: Array, positions_T: Array, keys_BxSxHxD: Array, values_BxSxHxD: Array,
           key_pos_S: Array, window: int | None,
           persistent: tuple[Array, Array] | None = None) -> Array:
  """Causal (and windowed) softmax attention of queries at `positions` over keys at `key_pos`
  (< 0: an empty slot), scores and softmax in float32. The explicit-position form serves
  KV caches, context-parallel halos and any mixer that attends over keys it assembled.
  persistent: (keys, values) [P, H, D] that every query sees (no position)."""
  visible = (key_pos_S[None, :] >= 0) & (key_pos_S[None, :] <= positions_T[:, None])
  if window is not None:
    visible &= key_pos_S[None, :] > positions_T[:, None] - window
  if persistent is not None:
    batch = keys_BxSxHxD.shape[0]
    extra = lambda y: jnp.broadcast_to(y.astype(keys_BxSxHxD.dtype)[None], (batch,) + y.shape)
    keys_BxSxHxD = jnp.concatenate([extra(persistent[0]), keys_BxSxHxD], axis=1)
    values_BxSxHxD = jnp.concatenate([extra(persistent[1]), values_BxSxHxD], axis=1)
    visible = jnp.concatenate(
        [jnp.ones((visible.shape[0], persistent[0].shape[0]), bool), visible], axis=1)
  acc = jnp.promote_types(q_BxTxHxD.dtype, jnp.float32)
  scores = jnp.einsum("bthd,bshd->bhts", q_BxTxHxD, keys_BxSxHxD, preferred_element_type=acc)
  scale = jnp.sqrt(q_BxTxHxD.shape[-1]).astype(acc)
  scores = jnp.where(visible, scores / scale, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhts,bshd->bthd", probs.astype(q_BxTxHxD.dtype), values_BxSxHxD,
                    preferred_element_type=acc).astype(q_BxTxHxD.dtype)


def init_kv_ring(batch: int, slots: int, num_heads: int, head_dim: int, dtype) -> dict:
  """A ring of `slots` keys and values; slot_pos holds each slot's stream position (-1: empty)."""
  shape = (batch, slots, num_heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "slot_pos": jnp.full((slots,), -1, jnp.int32)}


def attend_and_write(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, positions_T: Array,
                     ring: dict, window: int | None,
                     persistent: tuple[Array, Array] | None = None) -> tuple[Array, dict]:
  """Attend T new tokens over the ring's keys (and `persistent` ones, see attend) and each
  other, then write them into the ring (only the last `slots` new keys can be seen again)."""
  t, slots = k_BxTxHxD.shape[1], ring["k"].shape[1]
  keys = jnp.concatenate([ring["k"], k_BxTxHxD], axis=1)
  values = jnp.concatenate([ring["v"], v_BxTxHxD], axis=1)
  key_pos = jnp.concatenate([ring["slot_pos"], positions_T])
  o = attend(q_BxTxHxD, positions_T, keys, values, key_pos, window, persistent)
  keep = min(t, slots)
  write = positions_T[t - keep:] % slots
  ring = {"k": ring["k"].at[:, write].set(k_BxTxHxD[:, t - keep:]),
          "v": ring["v"].at[:, write].set(v_BxTxHxD[:, t - keep:]),
          "slot_pos": ring["slot_pos"].at[write].set(positions_T[t - keep:])}
  return o, ring


def windowed_halo(k_BxTxHxD: Array, v_BxTxHxD: Array, positions_T: Array, window: int | None,
                  axis: str) -> tuple[Array, Array, Array]:
  """Context parallelism: the keys and values this device's queries can see, with positions.
  Full attention all-gathers them; a window takes the previous device's last window - 1."""
  if window is None:
    gather = lambda y: jax.lax.all_gather(y, axis, axis=1, tiled=True)
    keys, values = gather(k_BxTxHxD), gather(v_BxTxHxD)
    return keys, values, jnp.arange(keys.shape[1], dtype=jnp.int32)
  halo = window - 1
  keys = jnp.concatenate([previous_tokens(k_BxTxHxD, halo, axis), k_BxTxHxD], axis=1)
  values = jnp.concatenate([previous_tokens(v_BxTxHxD, halo, axis), v_BxTxHxD], axis=1)
  key_pos = jnp.concatenate([positions_T[0] - halo + jnp.arange(halo, dtype=jnp.int32),
                             positions_T])
  return keys, values, key_pos


def blocked_window_attend(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, window: int,
                          persistent: tuple[Array, Array] | None = None) -> Array:
  """Sliding-window attention from position 0 in blocks of `window` queries, each over the
  previous block's keys and its own (and `persistent` ones): scores [T/window, window,
  2 window + P] instead of [T, T]. T need not be a multiple of the window (padded at the end,
  which no real query sees)."""
  b, t, h, d = q_BxTxHxD.shape
  n = -(-t // window)
  blocks = lambda y: jnp.pad(y, [(0, 0), (0, n * window - t), (0, 0), (0, 0)]).reshape(
      b, n, window, h, d)
  with_previous = lambda y: jnp.concatenate(
      [jnp.concatenate([jnp.zeros_like(y[:, :1]), y[:, :-1]], axis=1), y], axis=2)
  q, keys, values = blocks(q_BxTxHxD), with_previous(blocks(k_BxTxHxD)), with_previous(
      blocks(v_BxTxHxD))
  pos_NxW = jnp.arange(n * window, dtype=jnp.int32).reshape(n, window)
  key_pos = jnp.concatenate([pos_NxW - window, pos_NxW], axis=1)   # block 0's "previous": < 0
  one_block = lambda q, pos, k, v, kp: attend(q, pos, k, v, kp, window, persistent)
  o = jax.vmap(one_block, in_axes=(1, 0, 1, 1, 0), out_axes=1)(q, pos_NxW, keys, values, key_pos)
  return o.reshape(b, n * window, h, d)[:, :t]


def causal_attention(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, window: int | None,
                     persistent: tuple[Array, Array] | None = None,
                     implementation: str = "auto") -> Array:
  """Causal (windowed) self-attention of a sequence from position 0. cuDNN's fused kernel where
  it applies (GPU, 16-bit, no persistent tokens); elsewhere `attend` in the input's precision
  (jax's XLA attention takes its softmax in float32 even for float64), with a window in blocks
  so that no T x T scores are built."""
  if implementation == "auto":
    implementation = ("cudnn" if target_platform() == "gpu" and persistent is None
                      and q_BxTxHxD.dtype in (jnp.bfloat16, jnp.float16) else "xla")
  if implementation == "cudnn":
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, is_causal=True,
                                        local_window_size=local, implementation="cudnn")
  if window is None:
    positions = jnp.arange(q_BxTxHxD.shape[1], dtype=jnp.int32)
    return attend(q_BxTxHxD, positions, k_BxTxHxD, v_BxTxHxD, positions, None, persistent)
  return blocked_window_attend(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, window, persistent)


class Attention(nnx.Module):

  def __init__(self, config: AttentionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    self.dtype = dtype
    inner = config.num_heads * config.head_dim
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                     rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj = (linear(config.d_model, inner) for _ in range(3))
    self.gate_proj = linear(config.d_model, inner)
    self.out_proj = linear(inner, config.d_model)
    if config.persistent_tokens:   # created last: P = 0 leaves parameters and RNG streams as before
      self.persistent = nnx.Param(jax.random.normal(
          rngs.params(), (config.persistent_tokens, config.d_model), param_dtype))

  def _heads(self, y):
    return y.reshape(y.shape[:-1] + (self.config.num_heads, self.config.head_dim))

  def queries(self, x_BxTxD: Array, positions_T: Array) -> Array:
    return rope(self._heads(self.q_proj(x_BxTxD)), positions_T, self.config.rope_base)

  def keys_values(self, x_BxTxD: Array, positions_T: Array) -> tuple[Array, Array]:
    k = rope(self._heads(self.k_proj(x_BxTxD)), positions_T, self.config.rope_base)
    return k, self._heads(self.v_proj(x_BxTxD))

  def persistent_kv(self) -> tuple[Array, Array] | None:
    """The persistent tokens' keys and values [P, H, D] (no RoPE), or None when P = 0."""
    if not self.config.persistent_tokens:
      return None
    tokens = self.persistent[...].astype(self.dtype)
    return self._heads(self.k_proj(tokens)), self._heads(self.v_proj(tokens))

  def _project(self, x, positions_T):
    return (self.queries(x, positions_T),) + self.keys_values(x, positions_T)

  def output(self, o_BxTxHxD: Array, x: Array) -> Array:
    """The attention output [B, T, H, D] of queries from x, gated by x and projected."""
    b, t = x.shape[:2]
    o = o_BxTxHxD.reshape(b, t, self.config.num_heads * self.config.head_dim)
    return self.out_proj(o * jax.nn.silu(self.gate_proj(x)))

  def __call__(self, x_BxTxD: Array, context_axis: str | None = None) -> Array:
    """context_axis: inside shard_map with the sequence split over that mesh axis; x is this
    device's slice. SWA takes the previous device's last window - 1 keys (a halo), full
    attention all-gathers the keys and values."""
    c = self.config
    x = x_BxTxD.astype(self.dtype)
    if context_axis is not None:
      return self._context_parallel(x, context_axis)
    q, k, v = self._project(x, jnp.arange(x.shape[1]))
    return self.output(causal_attention(q, k, v, c.window, self.persistent_kv(),
                                        c.implementation), x)

  def _context_parallel(self, x, axis):
    length = x.shape[1]
    start = jax.lax.axis_index(axis) * length
    positions = start + jnp.arange(length, dtype=jnp.int32)
    q, k, v = self._project(x, positions)
    keys, values, key_pos = windowed_halo(k, v, positions, self.config.window, axis)
    return self.output(attend(q, positions, keys, values, key_pos, self.config.window,
                               self.persistent_kv()), x)

  # --- streaming and decoding: a KV cache, a ring of the last `window` keys for SWA ---

  def init_cache(self, batch: int, max_length: int | None = None) -> dict:
    """Slots for the keys a future token can see: the window (SWA), or max_length tokens (full
    attention, which needs it)."""
    c = self.config
    if c.window is None and max_length is None:
      raise ValueError("full attention keeps every key: init_cache needs max_length")
    slots = c.window if max_length is None else min(c.window or max_length, max_length)
    return dict(init_kv_ring(batch, slots, c.num_heads, c.head_dim, self.dtype),
                position=jnp.zeros((), jnp.int32))

  def alignment(self) -> int:
    return 1

  def extend(self, x_BxTxD: Array, cache: dict) -> tuple[Array, dict]:
    """Attend T new tokens over the cached keys and each other; write them into the cache.

    Full attention's cache must hold the whole stream: past max_length (init_cache) the oldest
    keys would be overwritten, so callers check the length first (models/decoding.py)."""
    x = x_BxTxD.astype(self.dtype)
    start = cache["position"]
    positions = start + jnp.arange(x.shape[1], dtype=jnp.int32)
    q, k, v = self._project(x, positions)
    ring = {name: cache[name] for name in ("k", "v", "slot_pos")}
    o, ring = attend_and_write(q, k, v, positions, ring, self.config.window, self.persistent_kv())
    return self.output(o, x), dict(ring, position=start + x.shape[1])
