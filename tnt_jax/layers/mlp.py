"""The SwiGLU feed-forward block of every model block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class SwiGLU(nnx.Module):
  """W_down [silu(x W_gate) * (x W_up)]."""

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                     rngs=rngs)
    self.gate, self.up, self.down = linear(d_model, hidden), linear(d_model, hidden), linear(
        hidden, d_model)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
