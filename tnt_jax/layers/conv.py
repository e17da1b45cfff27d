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
    return self.extend(x_BxTxC, self.empty_history(x_BxTxC.shape[0], x_BxTxC.dtype))[0]

  def empty_history(self, batch: int, dtype) -> Array:
    """The inputs before t = 0: width - 1 zeros per channel."""
    return jnp.zeros((batch, self.width - 1, self.kernel.shape[1]), dtype)

  def extend(self, x_BxTxC: Array, history_BxWxC: Array) -> tuple[Array, Array]:
    """The outputs for x given the width - 1 inputs before it, and the history after it
    (streaming and decoding carry it from call to call)."""
    t = x_BxTxC.shape[1]
    kernel = self.kernel[...].astype(x_BxTxC.dtype)
    padded = jnp.concatenate([history_BxWxC.astype(x_BxTxC.dtype), x_BxTxC], axis=1)
    y = sum(padded[:, i:i + t] * kernel[i] for i in range(self.width))
    return y, padded[:, padded.shape[1] - (self.width - 1):]
