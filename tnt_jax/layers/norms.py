"""Normalisations used by the memory layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
NORM_EPS = 1e-6


def l2_normalize(x: Array, eps: float = NORM_EPS) -> Array:
  """x / ||x|| over the last axis, computed in float32 (at least)."""
  acc = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(acc)
  return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class HeadRMSNorm(nnx.Module):
  """RMSNorm of each head's vector on its own, with a learned scale per (head, feature)."""

  def __init__(self, num_heads: int, head_dim: int, *, eps: float = NORM_EPS,
               param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((num_heads, head_dim), param_dtype))

  def __call__(self, x_BxTxHxD: Array) -> Array:
    acc = jnp.promote_types(x_BxTxHxD.dtype, jnp.float32)
    x = x_BxTxHxD.astype(acc)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(acc)).astype(x_BxTxHxD.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis (the model's residual stream)."""

  def __init__(self, dim: int, *, eps: float = NORM_EPS, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: Array) -> Array:
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(acc)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (xf * self.scale[...].astype(acc)).astype(x.dtype)
