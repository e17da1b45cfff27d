"""MemoryConfig: everything that defines one deep memory (model, rule, loss, read mode, chunk)."""

from __future__ import annotations

import dataclasses
import operator

import jax
import jax.numpy as jnp

from tnt_jax.memory.losses import LOSSES
from tnt_jax.memory.models import MemoryModel
from tnt_jax.memory.rules import READ_MODES, MemoryState, UpdateRule


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  """One deep test-time memory (SPEC §1).

  read: "cumulative" reads W_t after token t's own update (Titans, TTT); "chunk_start" reads
    the state before the chunk, W_{xi(t, C)} (LaCT, TNT's global memory).
  chunk_size: C; gradients inside a chunk are taken at the chunk-start state. Chunks are
    counted from the first token of each call.
  """

  model: MemoryModel = MemoryModel()
  rule: UpdateRule = UpdateRule()
  loss: str = "l2"
  read: str = "cumulative"
  chunk_size: int = 16

  def __post_init__(self):
    try:
      chunk = operator.index(self.chunk_size)
    except TypeError:
      chunk = None
    if chunk is None or isinstance(self.chunk_size, bool) or chunk < 1:
      raise ValueError(f"chunk_size={self.chunk_size!r} must be an integer >= 1")
    object.__setattr__(self, "chunk_size", int(chunk))
    if self.loss not in LOSSES:
      raise ValueError(f"inner loss={self.loss!r} is unknown; expected one of {tuple(LOSSES)}")
    if self.read not in READ_MODES:
      raise ValueError(f"read={self.read!r} is unknown; expected one of {READ_MODES}")
    if self.rule.kind == "lact" and self.read != "chunk_start":
      raise ValueError(
          f"rule='lact' updates once per chunk, so read={self.read!r} is not defined for it; "
          "use read='chunk_start' (an update-then-read would leak the chunk's future tokens)")

  def init_state(self, initial_weights: dict, batch_size: int) -> MemoryState:
    """Broadcast the learned per-head W_init [H, ...] to a batch; momentum starts at zero.

    The state is float32 (float64 under jax_enable_x64 with float64 weights) whatever the
    compute dtype.
    """
    dtype = jnp.promote_types(jax.tree.leaves(initial_weights)[0].dtype, jnp.float32)
    weights = jax.tree.map(
        lambda w: jnp.broadcast_to(w.astype(dtype), (batch_size,) + w.shape), initial_weights)
    momentum = jax.tree.map(jnp.zeros_like, weights) if self.rule.has_momentum else None
    return MemoryState(weights, momentum)


def accumulation_dtype(compute_dtype, state: MemoryState):
  """The state's dtype: float32, or wider where the inputs or the given state are wider."""
  acc = jnp.promote_types(compute_dtype, jnp.float32)
  for leaf in jax.tree.leaves(state):
    acc = jnp.promote_types(acc, leaf.dtype)
  return acc
