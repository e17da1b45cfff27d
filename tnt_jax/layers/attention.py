"""Causal self-attention (full or sliding-window) with RoPE, the attention token mixer."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
  """window: None for full causal attention, else each token sees itself and the window - 1
  tokens before it. implementation: passed to jax.nn.dot_product_attention; "auto" picks cuDNN
  on GPU for 16-bit inputs and XLA elsewhere."""

  d_model: int
  num_heads: int
  head_dim: int | None = None
  window: int | None = None
  rope_base: float = 10000.0
  implementation: str = "auto"

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


def rope(x_BxTxHxD: Array, positions_T: Array, base: float) -> Array:
  """Rotary position embedding (rotate-half form)."""
  half = x_BxTxHxD.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions_T.astype(jnp.float32)[:, None] * freqs               # [T, D/2]
  cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
  x1, x2 = jnp.split(x_BxTxHxD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxD.dtype)


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

  def __call__(self, x_BxTxD: Array) -> Array:
    c = self.config
    x = x_BxTxD.astype(self.dtype)
    b, t, _ = x.shape
    heads = lambda y: y.reshape(b, t, c.num_heads, c.head_dim)
    positions = jnp.arange(t)
    q = rope(heads(self.q_proj(x)), positions, c.rope_base)
    k = rope(heads(self.k_proj(x)), positions, c.rope_base)
    v = heads(self.v_proj(x))
    impl = c.implementation
    if impl == "auto":
      impl = ("cudnn" if jax.default_backend() == "gpu"
              and x.dtype in (jnp.bfloat16, jnp.float16) else "xla")
    window = None if c.window is None else (c.window - 1, 0)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                     implementation=impl)
    o = o.reshape(b, t, c.num_heads * c.head_dim)
    return self.out_proj(o * jax.nn.silu(self.gate_proj(x)))
