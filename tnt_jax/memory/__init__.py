"""Deep memory models, inner losses, update rules, gates and the token-level reference."""

from tnt_jax.memory.config import MemoryConfig
from tnt_jax.memory.models import MemoryModel
from tnt_jax.memory.rules import Gates, MemoryState, UpdateRule

__all__ = ["Gates", "MemoryConfig", "MemoryModel", "MemoryState", "UpdateRule"]
