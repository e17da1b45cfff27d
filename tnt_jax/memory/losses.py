"""Inner (test-time) losses l(y = f(W; k), v), one scalar per token."""

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def l2_loss(y: Array, v: Array) -> Array:
  """Titans / TTT: ||f(W; k) - v||^2, summed over the feature axis."""
  return jnp.sum(jnp.square(y - v), axis=-1)


def dot_loss(y: Array, v: Array) -> Array:
  """LaCT: -f(W; k)^T v."""
  return -jnp.sum(y * v, axis=-1)


LOSSES: dict[str, Callable[[Array, Array], Array]] = {"l2": l2_loss, "dot": dot_loss}


def get_loss(name: str) -> Callable[[Array, Array], Array]:
  if name not in LOSSES:
    raise ValueError(f"inner loss={name!r} is unknown; expected one of {tuple(LOSSES)}")
  return LOSSES[name]
