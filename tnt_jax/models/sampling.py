"""Next-token sampling from logits: temperature, top-k, top-p (nucleus); temperature 0 = greedy."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature!r} must be >= 0 (0 = greedy)")
  if not (isinstance(top_k, int) and top_k >= 0):
    raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (0 = no top-k cut)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 = no nucleus cut)")


def sample(logits_BxV: Array, key: Array, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> Array:
  """One token per row, int32 [B]. top_k keeps the k most likely tokens, top_p the smallest set
  whose probability reaches p (always at least the most likely token)."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass of the more likely tokens
    cutoff = jnp.min(jnp.where(before < top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
