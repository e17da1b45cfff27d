"""LMConfig: a decoder LM's shape and its per-layer token mixers.

`pattern` names the mixer of each block, repeated cyclically over `num_layers`:
  memory mixers: "tnt", "titans", "ttt_linear", "ttt_mlp", "lact" (tnt_jax/layers presets)
  attention:     "attention" (full causal), "swa" (sliding window of `window` tokens)
  hybrids:       "mag:<memory>", "mal:<memory>", "mac:<memory>" (Titans MAG / MAL / MAC in one
                 block: sliding-window attention with that memory kind; tnt_jax/layers/hybrid.py,
                 mac.py; MAC's segment is `window`, a multiple of the memory's alignment)
so ("tnt",) is a pure TNT model and ("swa", "tnt") alternates. `mixer_options[kind]` overrides
the fields of that kind's layer config (e.g. {"tnt": {"local_chunks": (8,)}}); a hybrid's memory
takes its memory kind's options and its attention the "swa" options, so {"swa":
{"persistent_tokens": 4}} gives every SWA and hybrid attention Titans' persistent memory tokens
(tnt_jax/layers/attention.py). `ttt_e2e` makes it a TTT-E2E model: mutable MLPs in the last
blocks, trained at test time (tnt_jax/models/ttt_e2e.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from tnt_jax.layers.attention import AttentionConfig
from tnt_jax.layers.configs import PRESETS, MemoryLayerConfig, preset
from tnt_jax.layers.hybrid import HYBRIDS, HybridConfig, hybrid_config
from tnt_jax.layers.mac import MACConfig
from tnt_jax.models.ttt_e2e import TTTE2EConfig

ATTENTION_MIXERS = ("attention", "swa")
MIXERS = tuple(PRESETS) + ATTENTION_MIXERS
DTYPES = ("float32", "bfloat16", "float64")
EMBEDDING_LOOKUPS = ("auto", "take", "one_hot")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  head_dim: int | None = None
  mlp_hidden: int | None = None          # default: 8/3 d_model rounded up to a multiple of 32
  pattern: tuple[str, ...] = ("tnt",)
  mixer_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  window: int = 512                      # "swa" mixers
  rope_base: float = 10000.0
  tie_embeddings: bool = True
  # How tokens are embedded: "take" (a gather; its gradient is a scatter-add), "one_hot" (a
  # one-hot matmul; its gradient is a matmul) or "auto": one_hot where vocab_size <= mlp_hidden,
  # so the product costs no more than one of a block's MLP matmuls. At a byte vocabulary the
  # scatter-add's atomics all hit 256 rows: on an H100 it took 58 ms of the small TNT LM's
  # 353 ms step (docs/train_h100.md); the matmul is exact in the forward and deterministic.
  embedding_lookup: str = "auto"
  dtype: str = "bfloat16"                # compute dtype; parameters are float32
  remat: bool = False                    # rematerialise each block in the backward pass
  # Run the blocks as a lax.scan over groups of one pattern period (the parameters stay one
  # set per block): XLA compiles one group instead of every block, about num_layers / period
  # times less compile time (on a CPU at d_model 768: 40-55 s per unrolled TNT block, 49 s
  # for all 12 scanned; README, Training). False unrolls the blocks.
  scan_layers: bool = True
  # TTT-E2E (a TTTE2EConfig, or a dict of its fields): attention mixers only. Its forward is a
  # scan over mini-batches with the blocks unrolled inside (scan_layers is not used there) and
  # its own per-mini-batch remat (ttt_e2e.remat) instead of `remat`.
  ttt_e2e: TTTE2EConfig | None = None

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"model {name}={value!r} must be an integer >= 1")
    object.__setattr__(self, "pattern", tuple(self.pattern))
    if not self.pattern:
      raise ValueError("model pattern is empty; name at least one mixer, e.g. ('tnt',)")
    for kind in self.pattern:
      hybrid, _, memory = kind.partition(":")
      if kind not in MIXERS and not (hybrid in HYBRIDS and memory in PRESETS):
        raise ValueError(f"mixer {kind!r} in pattern={self.pattern} is unknown; expected one "
                         f"of {MIXERS}, or a hybrid {'/'.join(HYBRIDS)}:<memory kind> with a "
                         f"memory kind in {tuple(PRESETS)} (e.g. mag:tnt)")
    for kind in self.mixer_options:
      if kind not in MIXERS:
        raise ValueError(f"mixer_options has unknown mixer {kind!r}; expected one of {MIXERS}")
    if self.dtype not in DTYPES:
      raise ValueError(f"model dtype={self.dtype!r} must be one of {DTYPES}")
    if self.mlp_hidden is None:
      object.__setattr__(self, "mlp_hidden", -(-(8 * self.d_model // 3) // 32) * 32)
    if self.embedding_lookup not in EMBEDDING_LOOKUPS:
      raise ValueError(f"model embedding_lookup={self.embedding_lookup!r} must be one of "
                       f"{EMBEDDING_LOOKUPS}")
    for i in range(min(self.num_layers, len(self.pattern))):
      self.mixer_config(i)   # validate every distinct mixer now, before anything is built
    if self.ttt_e2e is not None:
      self._check_ttt_e2e()

  def _check_ttt_e2e(self):
    object.__setattr__(self, "ttt_e2e", TTTE2EConfig.from_value(self.ttt_e2e))
    others = sorted({kind for kind in self.pattern if kind not in ATTENTION_MIXERS})
    if others:
      raise ValueError(f"ttt_e2e needs attention mixers {ATTENTION_MIXERS} in every block; "
                       f"pattern={self.pattern} has {others}")
    if self.remat:
      raise ValueError("remat=True rematerialises the blocks of the parallel forward; a ttt_e2e "
                       "model checkpoints each mini-batch step instead (ttt_e2e.remat): set "
                       "remat=False")

  @property
  def one_hot_embedding(self) -> bool:
    if self.embedding_lookup == "auto":
      return self.vocab_size <= self.mlp_hidden
    return self.embedding_lookup == "one_hot"

  def mixer_kind(self, layer: int) -> str:
    return self.pattern[layer % len(self.pattern)]

  def mixer_config(self, layer: int
                   ) -> MemoryLayerConfig | AttentionConfig | HybridConfig | MACConfig:
    kind = self.mixer_kind(layer)
    hybrid, _, memory = kind.partition(":")
    if hybrid in HYBRIDS:
      return hybrid_config(hybrid, self._kind_config(memory), self._kind_config("swa"))
    return self._kind_config(kind)

  def mixer_parts(self, layer: int) -> tuple[MemoryLayerConfig | AttentionConfig, ...]:
    """The memory layers and attentions that layer's mixer is made of."""
    mixer = self.mixer_config(layer)
    return mixer.parts() if isinstance(mixer, (HybridConfig, MACConfig)) else (mixer,)

  def _kind_config(self, kind: str) -> MemoryLayerConfig | AttentionConfig:
    options = dict(self.mixer_options.get(kind, {}))
    common = dict(d_model=self.d_model, num_heads=self.num_heads, head_dim=self.head_dim)
    if kind in ATTENTION_MIXERS:
      window = self.window if kind == "swa" else None
      return _build(AttentionConfig, kind, dict(common, window=window, rope_base=self.rope_base,
                                                **options))
    return _build(lambda **kw: preset(kind, **kw), kind, dict(common, **options))


def _build(make, kind, fields):
  try:
    return make(**fields)
  except TypeError as e:   # an option the layer config does not have
    raise ValueError(f"mixer_options for {kind!r}: {e}") from None
