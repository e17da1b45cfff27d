"""Frozen configs of the memory layers, one per layer kind, and their presets.

Every kind describes the same layer (tnt_jax/layers/memory_layer.py): q/k/v projections, a
causal depthwise conv, SiLU, L2-normalised q and k, per-memory gate projections, the memory op,
a per-head output RMSNorm, an output gate and an output projection. Kinds differ only in the
memories they run, which each kind compiles to one `TNTConfig` (`memory_config()`): a global
memory plus zero or more local memories. Titans, TTT and LaCT are the no-local case.

    config = TNTLayerConfig(d_model=768, num_heads=12, global_chunk=2048, local_chunks=(8,))
    config = preset("titans", d_model=768, num_heads=12, chunk_size=64)

Lengths: a layer accepts any length T >= 1. The last global chunk, local chunk and local shard of
a sequence may be shorter; outputs at t never depend on tokens after t, so running a prefix gives
the prefix of the outputs. Chunks and shards are counted from the first token of each call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from tnt_jax.memory.config import MemoryConfig
from tnt_jax.memory.models import MemoryModel
from tnt_jax.memory.rules import UpdateRule
from tnt_jax.kernels.chunk_memory import KernelBlocks
from tnt_jax.ops.api import IMPLEMENTATIONS
from tnt_jax.ops.tnt import LocalMemory, TNTConfig
from tnt_jax.parallel.context import GLOBAL_HANDOFFS

TITANS_MEMORY = MemoryModel(kind="mlp", depth=2, expansion=4.0, activation="gelu")


def _positive_int(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name}={value!r} must be an integer >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryLayerConfig:
  """What every memory layer kind shares.

  head_dim: per-head size of q, k, v and the memory; default d_model // num_heads (which must
    then divide exactly).
  max_lr: theta = max_lr * sigmoid(x W + b), the inner learning rate's ceiling.
  max_momentum: eta = max_momentum * sigmoid(x W + b). Both ceilings bound how far learned gates
    can push the inner optimiser: with eta -> 1 and a deep memory, momentum accumulates without
    decay and the fast weights blow up within a few hundred tokens.
  chunk_lr_budget: each gd/titans memory's theta ceiling is
    min(max_lr, chunk_lr_budget * (1 - max_momentum) / C)   (titans; gd: budget / C).
    A chunk's gradients are all taken at one state, and titans' momentum runs per token, so when
    the chunk's keys agree its update is one gradient step of size sum(theta) / (1 - eta);
    gradient descent on the l2 loss diverges once that passes ~1 (measured: a global memory with
    C = 256 and theta 0.02 grew 1e6-fold per chunk; saturated gates on repeated tokens diverge
    at a budget of 0.5 with C = 128). The default 0.25 leaves room for the curvature to grow as
    outer training scales the memory (a budget of 1 still diverged after ~100-150 steps on an
    H100, docs/train_h100.md). LaCT's update is normalised (Muon, row norms) and keeps max_lr.
  theta_bias / eta_bias / alpha_bias: initial gate logits (theta starts at half its ceiling).
  implementation: the memory op's ("xla" chunkwise, "affine" a linear memory's chunks composed
    by an associative scan, "pallas" the fused kernel -- both with a logged fallback to "xla"
    where they cannot run the memory -- "reference" token loop for tests; ops/api.py).
  kernel_blocks: the fused kernel's settings for implementation="pallas", written as
    KernelBlocks.from_spec reads them: "default", or "field=value" joined by "+", e.g.
    "tile=32+save_every=8" (kernels/chunk_memory.py lists the fields); checked here.
  remat: recompute each memory chunk in the backward pass (less memory, more compute).
  global_handoff: under context parallelism, how the global memory's state crosses devices:
    "gather" (all-gather the sequence, every device scans it) or "chain" (ppermute the state
    from device to device); tnt_jax/parallel/context.py, measured in docs/context_parallel.md.
  shared_window: None, or run sliding-window attention of this many tokens over the layer's
    own q, k, v beside the memory and sum the two outputs (LaCT's hybrid, SPEC §1.4; the
    "lact_hybrid" preset sets it to the chunk size).
  """

  kind: ClassVar[str] = ""
  d_model: int
  num_heads: int
  head_dim: int | None = None
  conv_width: int = 4
  max_lr: float = 1.0
  max_momentum: float = 0.9
  chunk_lr_budget: float = 0.25
  theta_bias: float = 0.0
  eta_bias: float = 2.0
  alpha_bias: float = -5.0
  implementation: str = "xla"
  kernel_blocks: str = "default"
  remat: bool = False
  global_handoff: str = "chain"
  shared_window: int | None = None

  def __post_init__(self):
    _positive_int("d_model", self.d_model)
    _positive_int("num_heads", self.num_heads)
    _positive_int("conv_width", self.conv_width)
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(f"d_model={self.d_model} is not a multiple of num_heads="
                         f"{self.num_heads}; pass head_dim explicitly or change one of them")
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
    _positive_int("head_dim", self.head_dim)
    if not self.max_lr > 0 or not math.isfinite(self.max_lr):
      raise ValueError(f"max_lr={self.max_lr!r} must be a finite number > 0")
    if not self.chunk_lr_budget > 0:
      raise ValueError(f"chunk_lr_budget={self.chunk_lr_budget!r} must be > 0")
    if not 0 <= self.max_momentum < 1:
      raise ValueError(f"max_momentum={self.max_momentum!r} must be in [0, 1)")
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation={self.implementation!r} is unknown; expected one of "
                       f"{IMPLEMENTATIONS}")
    self.blocks   # KernelBlocks.from_spec raises on a bad field or value
    if self.global_handoff not in GLOBAL_HANDOFFS:
      raise ValueError(f"global_handoff={self.global_handoff!r} is unknown; expected one of "
                       f"{GLOBAL_HANDOFFS}")
    if self.shared_window is not None:
      _positive_int("shared_window", self.shared_window)
    self.memory_config()   # every kind validates its memories here, before anything is traced

  @property
  def blocks(self) -> KernelBlocks:
    """kernel_blocks parsed: the KernelBlocks every memory of the layer runs the kernel with."""
    return KernelBlocks.from_spec(self.kernel_blocks)

  def theta_ceiling(self, memory: MemoryConfig) -> float:
    """The largest inner learning rate the gates can give `memory` (see chunk_lr_budget)."""
    if memory.rule.kind == "lact":
      return self.max_lr
    momentum_gain = 1 - self.max_momentum if memory.rule.kind == "titans" else 1.0
    return min(self.max_lr, self.chunk_lr_budget * momentum_gain / memory.chunk_size)

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.head_dim

  def memory_config(self) -> TNTConfig:
    raise NotImplementedError

  def param_count(self) -> int:
    """Trainable parameters of the layer (what `nnx.state(layer, nnx.Param)` holds)."""
    d, inner, h, hd = self.d_model, self.inner_dim, self.num_heads, self.head_dim
    count = 3 * d * inner                 # q, k, v projections
    count += 3 * self.conv_width * inner  # their depthwise convolutions
    count += inner                        # output RMSNorm scale
    count += 2 * d * inner                # output gate and output projection
    if self.shared_window is not None:
      count += 3 * inner                  # shared attention: q, k and output RMSNorm scales
    tnt = self.memory_config()
    memories = [tnt.global_memory] + [local.memory for local in tnt.local_memories]
    for memory in memories:
      count += (d + 1) * h * len(memory.rule.required_gates())   # gate projection + bias
      for out_dim, in_dim in memory.model.layer_shapes(hd).values():
        count += h * out_dim * (in_dim + int(memory.model.bias))   # learned W_init (+ b)
      count += 2 * h * hd if memory.model.residual_norm else 0    # LayerNorm scale/offset
    return count


def _models_from_specs(config, *names) -> None:
  """Model fields given as strings (a config file's or flag's, e.g. "linear") become
  MemoryModel.from_spec's model."""
  for name in names:
    value = getattr(config, name)
    if isinstance(value, str):
      object.__setattr__(config, name, MemoryModel.from_spec(value))
    elif not isinstance(value, MemoryModel):
      raise ValueError(f"{name}={value!r} must be a MemoryModel or its spec string "
                       "(e.g. 'linear', 'mlp+expansion=2')")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TitansLayerConfig(MemoryLayerConfig):
  """Titans' neural long-term memory (LMM): one deep memory, momentum and forgetting."""

  kind: ClassVar[str] = "titans"
  chunk_size: int = 16
  model: MemoryModel = TITANS_MEMORY
  loss: str = "l2"
  read: str = "cumulative"
  max_lr: float = 0.02

  def __post_init__(self):
    _models_from_specs(self, "model")
    super().__post_init__()

  def memory_config(self) -> TNTConfig:
    return TNTConfig(MemoryConfig(self.model, UpdateRule("titans"), self.loss, self.read,
                                  self.chunk_size))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TTTLayerConfig(MemoryLayerConfig):
  """TTT-Linear / TTT-MLP: mini-batch gradient descent on x + LN(f(x)), no momentum or decay.

  chunk_size is TTT's mini-batch size b.
  """

  kind: ClassVar[str] = "ttt"
  model_kind: str = "linear"
  chunk_size: int = 16
  expansion: float = 4.0

  def __post_init__(self):
    if self.model_kind not in ("linear", "mlp"):
      raise ValueError(f"TTT model_kind={self.model_kind!r} must be 'linear' or 'mlp'")
    super().__post_init__()

  def memory_config(self) -> TNTConfig:
    model = MemoryModel(kind=self.model_kind, depth=2, expansion=self.expansion,
                        activation="gelu", residual_norm=True, bias=True)
    return TNTConfig(MemoryConfig(model, UpdateRule("gd"), "l2", "cumulative", self.chunk_size))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaCTLayerConfig(MemoryLayerConfig):
  """LaCT's large-chunk memory: SwiGLU fast weights, read at chunk start, one update per chunk
  (dot-product loss, optional momentum, Muon, row-norm restoring L2 normalisation)."""

  kind: ClassVar[str] = "lact"
  chunk_size: int = 2048
  expansion: float = 1.0
  loss: str = "dot"
  momentum: bool = False
  muon: bool = True

  def memory_config(self) -> TNTConfig:
    model = MemoryModel(kind="swiglu", expansion=self.expansion)
    rule = UpdateRule("lact", momentum=self.momentum, muon=self.muon)
    return TNTConfig(MemoryConfig(model, rule, self.loss, "chunk_start", self.chunk_size))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TNTLayerConfig(MemoryLayerConfig):
  """TNT: a global memory over large chunks read at chunk start, plus N >= 1 local memories
  over small chunks that reset to a learned state every shard (SPEC §2).

  local_chunks[i] is C_L of local i; shard_lengths is one S_L for all, or one per local. Every
  memory uses `global_model` / `local_model` and `rule`. For locals of different models, build
  the memories yourself: `TNTLayerConfig.from_memories(...)`.
  Rules checked here: at least one local; each S_L a multiple of its C_L; C_G and each S_L
  nested (one divides the other) so global chunks and shards share boundaries, which streaming
  and context-parallel slicing rely on.
  """

  kind: ClassVar[str] = "tnt"
  global_chunk: int = 2048
  local_chunks: tuple[int, ...] = (8,)
  shard_lengths: int | tuple[int, ...] = 2048
  global_model: MemoryModel = TITANS_MEMORY
  local_model: MemoryModel = TITANS_MEMORY
  rule: UpdateRule = UpdateRule("titans")
  loss: str = "l2"
  qk_projection: bool = True
  max_lr: float = 0.02
  memories: TNTConfig | None = None   # set by from_memories; overrides the fields above

  def __post_init__(self):
    _models_from_specs(self, "global_model", "local_model")
    object.__setattr__(self, "local_chunks", tuple(self.local_chunks))
    if isinstance(self.shard_lengths, (list, tuple)):
      object.__setattr__(self, "shard_lengths", tuple(self.shard_lengths))
    super().__post_init__()

  @classmethod
  def from_memories(cls, memories: TNTConfig, **layer_fields) -> "TNTLayerConfig":
    return cls(memories=memories, **layer_fields)

  def memory_config(self) -> TNTConfig:
    tnt = self.memories if self.memories is not None else self._build_memories()
    if not tnt.local_memories:
      raise ValueError("a TNT layer needs at least one local memory (local_chunks is empty); "
                       "for a single memory use TitansLayerConfig")
    global_chunk = tnt.global_memory.chunk_size
    for i, local in enumerate(tnt.local_memories):
      s = local.shard_length
      if s % global_chunk and global_chunk % s:
        raise ValueError(f"global chunk C_G={global_chunk} and local {i}'s shard length "
                         f"S_L={s} must be nested (one a multiple of the other)")
    return tnt

  def _build_memories(self) -> TNTConfig:
    _positive_int("global_chunk", self.global_chunk)
    shards = self.shard_lengths
    if isinstance(shards, tuple):
      if len(shards) != len(self.local_chunks):
        raise ValueError(f"shard_lengths={shards} must give one S_L per local chunk "
                         f"{self.local_chunks}, or be one integer")
    else:
      shards = (shards,) * len(self.local_chunks)
    for chunk in self.local_chunks:
      _positive_int("local chunk", chunk)
    global_memory = MemoryConfig(self.global_model, self.rule, self.loss, "chunk_start",
                                 self.global_chunk)
    locals_ = tuple(
        LocalMemory(MemoryConfig(self.local_model, self.rule, self.loss, "cumulative", chunk),
                    shard)
        for chunk, shard in zip(self.local_chunks, shards))
    return TNTConfig(global_memory, locals_, self.qk_projection)

  def with_local_chunks(self, local_chunks: tuple[int, ...]) -> "TNTLayerConfig":
    """The same layer with other local chunk sizes (TNT stage 2: e.g. {8} -> {1})."""
    local_chunks = tuple(local_chunks)
    if self.memories is None:
      return dataclasses.replace(self, local_chunks=local_chunks)
    locals_ = self.memories.local_memories
    if len(local_chunks) != len(locals_):
      raise ValueError(f"local_chunks={local_chunks} must give one chunk per local memory "
                       f"({len(locals_)})")
    new_locals = tuple(
        LocalMemory(dataclasses.replace(local.memory, chunk_size=chunk), local.shard_length)
        for local, chunk in zip(locals_, local_chunks))
    return dataclasses.replace(self, memories=dataclasses.replace(self.memories,
                                                                  local_memories=new_locals))


PRESETS = {
    "titans": lambda **kw: TitansLayerConfig(**kw),
    "ttt_linear": lambda **kw: TTTLayerConfig(**{"model_kind": "linear", "max_lr": 1.0, **kw}),
    "ttt_mlp": lambda **kw: TTTLayerConfig(**{"model_kind": "mlp", "max_lr": 0.1, **kw}),
    "lact": lambda **kw: LaCTLayerConfig(**kw),
    # LaCT's hybrid: the large-chunk memory and sliding-window attention (window = chunk) over
    # the same q, k, v, outputs summed
    "lact_hybrid": lambda **kw: LaCTLayerConfig(
        **{"shared_window": kw.get("chunk_size", LaCTLayerConfig.chunk_size), **kw}),
    "tnt": lambda **kw: TNTLayerConfig(**kw),
}


def preset(name: str, **fields) -> MemoryLayerConfig:
  """A layer config by preset name; `fields` (d_model, num_heads, ...) override its defaults."""
  if name not in PRESETS:
    raise ValueError(f"layer preset={name!r} is unknown; expected one of {tuple(PRESETS)}")
  return PRESETS[name](**fields)
