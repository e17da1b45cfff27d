"""Short causal depthwise convolution over time (the q/k/v "shift" of Titans, Mamba, GLA)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


class CausalDepthwiseConv(nnx.Module):
  """y_t[c] = sum_{i < width} kernel[i, c] * x_{t - width + 1 + i}[c]  (zeros before t = 0).

  `width` is small (4), so it is written as a sum of shifted copies: no convolution primitive,
  identical on every backend, and the causal structure is explicit.
  """

  def __init__(self, channels: int, width: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    if width < 1:
      raise ValueError(f"conv width={width} must be >= 1")
    self.width = width
    bound = 1.0 / math.sqrt(width)
    self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (width, channels), param_dtype,
                                               -bound, bound))

  def __call__(self, x_BxTxC: Array) -> Array:
    t = x_BxTxC.shape[1]
    kernel = self.kernel[...].astype(x_BxTxC.dtype)
    padded = jnp.pad(x_BxTxC, [(0, 0), (self.width - 1, 0), (0, 0)])
    return sum(padded[:, i:i + t] * kernel[i] for i in range(self.width))
