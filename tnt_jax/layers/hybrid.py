"""Titans' attention hybrids, each one token mixer of a block (SPEC §3).

  "mag:<memory>"  MAG, memory as a gate: sliding-window attention and a memory layer read the
                  same input side by side; o = RMSNorm(attention(x)) * sigmoid(RMSNorm(memory(x))),
                  the two outputs normalised with learned vector weights and then gated
                  (Titans §4.2).
  "mal:<memory>"  MAL, memory as a layer: the memory layer, then sliding-window attention over its
                  output, o = attention(memory(x)) (Titans §4.3).
  "mac:<memory>"  MAC, memory as context: per segment of `window` tokens, retrieve from the
                  memory, attend over [persistent ‖ retrieved ‖ segment], update the memory with
                  the attention output (Titans §4.1; tnt_jax/layers/mac.py, MACConfig/MACMixer).

<memory> is any memory-layer kind (titans, tnt, ...), configured by that kind's mixer options;
so "mag:tnt" is TNT-Titans MAG. The attention takes the "swa" kind's options, so persistent
memory tokens come from `mixer_options={"swa": {"persistent_tokens": P}}` (for every SWA mixer
too). MAG and MAL run context-parallel and decode through their parts' caches; MAC decodes
through its own cache and has no context-parallel form.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tnt_jax.layers.attention import Attention, AttentionConfig
from tnt_jax.layers.configs import MemoryLayerConfig
from tnt_jax.layers.mac import MACConfig, MACMixer
from tnt_jax.layers.memory_layer import MemoryLayer
from tnt_jax.layers.norms import RMSNorm

Array = jax.Array
HYBRIDS = ("mag", "mal", "mac")


def hybrid_config(kind: str, memory: MemoryLayerConfig, attention: AttentionConfig
                  ) -> "HybridConfig | MACConfig":
  """The config of hybrid `kind` (one of HYBRIDS) from its memory and attention configs."""
  if kind == "mac":
    return MACConfig(memory, attention)
  return HybridConfig(kind, memory, attention)


def hybrid_mixer(config: "HybridConfig | MACConfig", *, rngs: nnx.Rngs, dtype=jnp.float32):
  if isinstance(config, MACConfig):
    return MACMixer(config, rngs=rngs, dtype=dtype)
  return HybridMixer(config, rngs=rngs, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class HybridConfig:
  kind: str                      # "mag" | "mal" (MAC: MACConfig)
  memory: MemoryLayerConfig
  attention: AttentionConfig

  def __post_init__(self):
    if self.kind not in ("mag", "mal"):
      hint = "; MAC is MACConfig (hybrid_config builds either)" if self.kind == "mac" else ""
      raise ValueError(f"hybrid kind={self.kind!r} must be 'mag' or 'mal'{hint}")
    if self.memory.d_model != self.attention.d_model:
      raise ValueError(f"hybrid {self.kind}: memory d_model={self.memory.d_model} and "
                       f"attention d_model={self.attention.d_model} differ")

  def parts(self) -> tuple[MemoryLayerConfig, AttentionConfig]:
    return self.memory, self.attention


class HybridMixer(nnx.Module):

  def __init__(self, config: HybridConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    self.memory = MemoryLayer(config.memory, rngs=rngs, dtype=dtype)
    self.attention = Attention(config.attention, rngs=rngs, dtype=dtype)
    if config.kind == "mag":
      self.attention_norm = RMSNorm(config.attention.d_model)
      self.memory_norm = RMSNorm(config.memory.d_model)

  def _gate(self, attended: Array, remembered: Array) -> Array:
    return self.attention_norm(attended) * jax.nn.sigmoid(self.memory_norm(remembered))

  def __call__(self, x_BxTxD: Array, context_axis: str | None = None) -> Array:
    if self.config.kind == "mag":
      return self._gate(self.attention(x_BxTxD, context_axis),
                        self.memory(x_BxTxD, context_axis))
    return self.attention(self.memory(x_BxTxD, context_axis), context_axis)

  # --- streaming and decoding: the parts' caches side by side ---

  def init_cache(self, batch: int, max_length: int | None = None) -> dict:
    return {"memory": self.memory.init_cache(batch),
            "attention": self.attention.init_cache(batch, max_length)}

  def alignment(self) -> int:
    return self.memory.alignment()   # attention extends from any position

  def extend(self, x_BxTxD: Array, cache: dict) -> tuple[Array, dict]:
    if self.config.kind == "mag":
      attended, attention_cache = self.attention.extend(x_BxTxD, cache["attention"])
      remembered, memory_cache = self.memory.extend(x_BxTxD, cache["memory"])
      out = self._gate(attended, remembered)
    else:
      remembered, memory_cache = self.memory.extend(x_BxTxD, cache["memory"])
      out, attention_cache = self.attention.extend(remembered, cache["attention"])
    return out, {"memory": memory_cache, "attention": attention_cache}
