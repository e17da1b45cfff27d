"""Fused Pallas kernel of the chunkwise memory op (SPEC §1.2-1.3), with its jnp reference.

One kernel program owns one (batch, head) and walks that row's chunks in order inside the launch,
holding the fast weights W (and Titans' momentum S) on chip in float32 from the first chunk to the
last. Per chunk it does, in one pass (dual form, as in ops/chunkwise.py):

    keys:    forward of f(W0; k) layer by layer, loss gradient, backward -> per-token (delta, a)
    read:    cumulative  o_t = f(W_t; q_t), each dense layer as  p_t (W0 x) + q_t (S0 x)
                                                                  + (R o (x a^T)) delta
             chunk_start o_t = f(W0; q_t)
    update:  W1 = p W0 + q S0 + sum_j c_j delta_j a_j^T ;  S1 = r S0 + sum_j s_j delta_j a_j^T

The gate coefficients (p, q, r, R, c, s; ops/transitions.py) are O(C^2) per chunk and computed
before the launch in XLA; everything O(C d h) is in the kernel. Matmul operands are in the input
dtype, accumulation and the state in float32, exactly as the XLA path rounds them.

Drivers (one chunk step, `_chunk_step`, shared by all):
  "sequential_grid"  grid (batch*heads, chunks) with the chunk axis sequential; the state lives in
                     the final-state output block, which stays resident while its block index is
                     unchanged. Mosaic TPU, and interpret mode anywhere.
  "chunk_loop"       grid (batch*heads,); a fori_loop over chunks inside the program with the state
                     as the loop carry (registers). GPU (Pallas' Triton lowering), and interpret.
With KernelBlocks.hidden_slice a 2-layer mlp's state instead stays in the final-state buffer and
each step streams it in hidden-unit slices (kernels/sliced_mlp.py; opt-in, measured slower).

Backward (`jax.custom_vjp` on the row layout; layout changes and the gate coefficients around it
are plain JAX, so their gradients come from autodiff):
  "fused"  the forward also writes the start state of every s-th chunk (float32, [rows,
           ceil(N / s), out, in] per layer; s = KernelBlocks.save_every, ~sqrt(N) by default) to
           HBM. The backward takes the groups of s chunks last to first: the forward kernel
           re-runs one group from its saved state, saving each chunk-start state, and a reverse
           kernel walks the group carrying the state's cotangent on chip, per chunk evaluating
           the vjp of the same `_chunk_step` at the saved state (jax.vjp traced inside the
           kernel body: one chunk step's math, so the backward can never drift from the
           forward). Memory: N / s + s states instead of N, for one more forward; s = 1 saves
           every state and recomputes nothing. See docs/kernel_notes.md.
  "xla"    version 1: recompute with the jnp reference and take its vjp.

Supported: models "linear", "mlp" (any depth) and "swiglu" without bias or residual norm; losses
l2 and dot; rules gd and titans; both read modes. A chunk-start read whose chunk is past the
activation limit runs, with KernelBlocks.tile set, on the tile kernel (kernels/chunk_start.py).
Anything else (TTT's bias/LayerNorm, the lact rule) is refused by `unsupported_reason` and
ops/api.py falls back to XLA with a logged reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import NamedTuple

from absl import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from tnt_jax.memory.config import MemoryConfig
from tnt_jax.memory.rules import Gates, MemoryState
from tnt_jax.kernels.sliced_mlp import SlicedStep
from tnt_jax.kernels.step_math import LAYOUTS, ChunkLayout
from tnt_jax.kernels.step_math import act_and_grad as _act_and_grad
from tnt_jax.kernels.step_math import one_dtype_per_matmul as _one_dtype_per_matmul
from tnt_jax.ops import transitions
from tnt_jax.platform import target_core_count, target_memory_bytes, target_platform
from tnt_jax.spec_strings import boolean, natural, parse_fields

Array = jax.Array
DRIVERS = ("sequential_grid", "chunk_loop")
BACKWARDS = ("fused", "xla")
LOWERINGS = ("pallas", "mosaic_gpu")    # KernelBlocks.row_lowering / tile_lowering
ROW_LOWERINGS = ("auto",) + LOWERINGS
TILE_LOWERINGS = LOWERINGS
# The driver each platform compiles; elsewhere only interpret mode runs the kernel.
PLATFORM_DRIVER = {"tpu": "sequential_grid", "gpu": "chunk_loop"}
# Each driver's (max_state_bytes, max_chunk_activations) where KernelBlocks leaves them None.
# GPU: an H100's register file (measured, docs/kernel_notes.md v1-v6). TPU: what libtpu compiles
# within the 16 MiB of scoped VMEM of v4 and v5p (the Titans mlp at d = 128 with hidden 512, a
# 1 MiB state, in float32 and bf16; twice that state runs out of VMEM: docs/kernel.md, TPU).
# No speed was measured on a TPU.
DRIVER_BUDGETS = {"chunk_loop": (256 * 1024, 4096), "sequential_grid": (1024 * 1024, 8192)}


@dataclasses.dataclass(frozen=True)
class KernelBlocks:
  """Launch parameters. The block itself is fixed: one (batch, head) row, one chunk at a time.

  num_warps / num_stages: GPU (Triton) only; num_warps None picks 4 for a linear memory and 8
    for an mlp (measured on an H100, docs/kernel_notes.md). backward_num_warps: the reverse
    kernel's (None: num_warps).
  max_state_bytes: the largest per-row float32 state (weights + momentum) the kernel accepts;
    larger states spill out of registers / VMEM. None: the driver's (DRIVER_BUDGETS).
  backward: "fused" (a reverse kernel over the chunk-start states the forward saved) or "xla"
    (recompute with the jnp reference and take its vjp; version 1, kept for comparison).
  save_every: the fused backward's checkpoint spacing. The forward saves the state at the start
    of every `save_every`-th chunk; the backward re-runs the forward kernel over one group of
    chunks at a time (saving each chunk's start state) and then walks that group in reverse, so
    the residuals are N / save_every + save_every states instead of N, for one more forward.
    1 saves every chunk-start state and recomputes nothing (fastest, most memory). None picks 1
    where every chunk's state fits max_saved_bytes, else round(sqrt(N)) (like ops/chunkwise.py's
    ~sqrt(N) chunk groups, the least memory); see checkpoint_spacing.
  max_saved_bytes: the budget of one call's saved chunk states on a device (all its rows, with
    the compute-dtype copies the forward saves beside them at spacing 1). None:
    SAVED_STATES_FRACTION of the device's memory as JAX reports it (`bytes_limit`); where it
    reports none (CPU, another kind of device) the spacing is round(sqrt(N)). Without block remat
    every memory layer's saved states are alive at once in the backward pass: lower this (or
    set save_every) if a model with many memory layers runs out of memory.
  rerun_groups: how many of those groups the fused backward re-runs in one launch, their rows
    stacked (each group's re-run needs only its saved start state), before walking them back in
    one reverse launch. Where a launch's programs leave SMs idle -- one sequence of 12 heads is
    12 programs, or 48 for the Mosaic GPU mlp's clusters, on an H100's 132 SMs -- k groups
    re-run in the time of one; the backward then holds k groups' chunk states instead of one.
    None (auto): `rerun_groups()`, as many as fill the GPU's SMs (compiled GPU; 1 elsewhere: a
    TPU core and the interpreter run a grid's programs in turn). Not with value_split's shared
    rows (1 there).
  overlap_reruns: re-run the next groups in the same launch as the walk of the current ones, on
    SMs of their own (`mgpu_launch`; `_rows_backward_pipelined`), so the re-runs hide behind the
    walk where its rows leave SMs idle. rerun_groups still counts the groups per step (None:
    as many as fill the SMs alone; beside the walk they re-run in up to two waves, within the
    walk of as many groups). The backward holds two steps' chunk states instead of one. None
    (auto): on where the Mosaic GPU mlp forward and reverse walk run, compiled, and the walk
    leaves room for at least one group's re-run (one sequence of 12 heads on an H100: 48
    programs walk, 2 x 48 re-run on the other 76 SMs); off elsewhere. True elsewhere runs the
    same schedule with the re-run launched after the walk (where the kernels cannot share a
    launch), which only costs memory; False: re-run, then walk (`rerun_groups` together).
  hidden_slice: 0 carries the whole state as the chunk loop's value (in registers on GPU). h > 0
    (a 2-layer mlp only) keeps the state in memory and streams it h hidden units at a time
    (kernels/sliced_mlp.py): only a slice is live, so the state budget and the activation limit
    apply to one slice. Ignored for other models.
  layout: how a chunk's activations are laid out in the step (step_math.ChunkLayout):
    "tokens" ([C, width], the C tokens as every matmul's M dimension) or "features" ([width, C],
    the feature width as M: 64-256 rows, the shape Hopper's wgmma takes). Same math; the
    carried-state step only (hidden_slice must be 0). None picks "features" for a linear memory
    on the GPU driver and "tokens" otherwise (measured on an H100: the linear forward 1.24x
    faster in "features", the mlp's 1.2x slower; docs/kernel_notes.md v6).
  max_chunk_activations: the largest C x (widest layer) a compiled chunk step may hold (None:
    the driver's, DRIVER_BUDGETS). A
    chunk's activations and scores live in registers; past this XLA's batched matmuls win
    (measured on an H100: an mlp with hidden 256 is 1.6x faster than XLA at C = 16 and 3x slower
    at C = 64; docs/kernel_notes.md).
  tile: 0 (off), or a power of 2: a chunk-start read past max_chunk_activations (TNT's global
    memory) then runs on the tile kernel (kernels/chunk_start.py; in interpret mode too) with
    this many tokens per program; a smaller chunk is one tile. Off by default: measured on an
    H100 at C = 2048 the Titans mlp's forward is 1.2x XLA's but its forward+backward 2x slower
    (docs/kernel_notes.md, v8), so those reads run on XLA. 32 is the measured best tile (an mlp
    tile's float32 activations, 32 x hidden 256, stay in registers).
  tile_lowering: which kernels run those tiles. "pallas": kernels/chunk_start.py (Triton on the
    GPU, Mosaic TPU, or interpreted). "mosaic_gpu": kernels/chunk_start_mgpu.py, Hopper wgmma
    through Pallas' Mosaic GPU lowering (bf16, linear and 2-layer mlp memories; interpreted
    on other platforms only when interpret is set); `tile` is then rounded up to a multiple of
    its 64-token wgmma tile and sets each program's token split.
  row_lowering: which kernel runs the row forward. "auto" (the default): "mosaic_gpu" where it
    was measured faster -- a linear memory with the cumulative read or a 2-layer mlp, compiled
    on a Hopper GPU (H100, 32K tokens, fwd+bwd: linear Titans C = 16 1.5x Triton's, gd 1.3x, a
    TNT memory's local 1.1x; the Titans mlp with hidden 256, with its reverse walk, 4.8x
    cumulative and 4.3x chunk-start, a TNT memory of them 2.0x; docs/kernel_notes.md v13-v14,
    v17-v18) -- and where
    that kernel takes the op; "pallas"
    elsewhere, without a log line. "pallas": the chunk loop above (Triton on the
    GPU, Mosaic TPU, or interpreted). "mosaic_gpu": Hopper wgmma through Pallas' Mosaic GPU
    lowering, bf16, the "features" layout, chunks padded to 16, 32 or 64 (interpreted elsewhere
    when interpret is set): kernels/chunk_rows_mgpu.py for linear memories, whose fused backward
    walks the chunks on kernels/chunk_rows_mgpu_reverse.py where that fits in shared memory (gd
    at chunks of 16 and 32, Titans at 16, d = 64), else on the Pallas reverse kernel; and
    kernels/chunk_rows_mgpu_mlp.py for 2-layer mlps at d = 64 with hidden 64, 128 or 256 (one
    program of a thread-block cluster per 64 hidden units), whose fused backward walks the
    chunks on kernels/chunk_rows_mgpu_mlp_reverse.py (the same cluster) where that fits in
    shared memory (Titans at chunks of 16, gd at 16 and, up to hidden 128, 32), else on the
    Pallas reverse kernel (token-major). An op the Mosaic GPU kernel does not take (swiglu, a deeper
    mlp, Titans at d = 128, ...) runs on the Pallas row kernel, forward and backward, with the
    reason logged once (`rows_blocks`), so one setting serves every memory of a model.
  reverse_lowering: the fused backward's reverse walk: "" follows row_lowering, "pallas" forces
    the Pallas reverse kernel after a Mosaic GPU forward (to compare the two), "mosaic_gpu"
    needs row_lowering="mosaic_gpu" (its saved states and layout).
  value_split: a linear memory's (batch, head) row runs as this many rows of head_dim /
    value_split output features each (`_split_value_rows`; exact: W x with the l2 or dot loss
    couples no two output features), so each program holds a slice of the state and the GPU
    gets more programs. None (auto): `value_split()`'s measured rule (d >= 128 on the compiled
    GPU Pallas row kernel; H100: one sequence of d = 128 6.1x faster than whole, a TNT memory
    1.7x; docs/kernel_notes.md v16). Ignored for mlp and swiglu memories and the tile kernel;
    not with row_lowering="mosaic_gpu".
  """
  num_warps: int | None = None
  num_stages: int = 1
  max_state_bytes: int | None = None
  max_chunk_activations: int | None = None
  backward: str = "fused"
  save_every: int | None = None
  max_saved_bytes: int | None = None
  rerun_groups: int | None = None
  overlap_reruns: bool | None = None
  backward_num_warps: int | None = None
  hidden_slice: int = 0
  layout: str | None = None
  tile: int = 0
  tile_lowering: str = "pallas"
  row_lowering: str = "auto"
  reverse_lowering: str = ""
  value_split: int | None = None

  def __post_init__(self):
    if self.backward not in BACKWARDS:
      raise ValueError(f"KernelBlocks.backward={self.backward!r} is unknown; expected one of "
                       f"{BACKWARDS}")
    for name, allowed in (("tile_lowering", LOWERINGS), ("row_lowering", ROW_LOWERINGS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"KernelBlocks.{name}={getattr(self, name)!r} is unknown; expected one "
                         f"of {allowed}")
    if self.reverse_lowering not in ("",) + LOWERINGS:
      raise ValueError(f"KernelBlocks.reverse_lowering={self.reverse_lowering!r} is unknown; "
                       f"expected '' (row_lowering's) or one of {LOWERINGS}")
    if self.reverse_lowering == "mosaic_gpu" and self.row_lowering != "mosaic_gpu":
      raise ValueError("KernelBlocks.reverse_lowering='mosaic_gpu' walks the states the Mosaic "
                       f"GPU forward saves; got row_lowering={self.row_lowering!r}")
    if self.layout is not None and self.layout not in LAYOUTS:
      raise ValueError(f"KernelBlocks.layout={self.layout!r} is unknown; expected one of "
                       f"{LAYOUTS}")
    for name in ("num_warps", "num_stages", "max_state_bytes", "max_chunk_activations",
                 "save_every", "max_saved_bytes", "rerun_groups", "backward_num_warps"):   # hidden_slice, tile: below
      value = getattr(self, name)
      if value is None and name != "num_stages":
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"KernelBlocks.{name}={value!r} must be an integer >= 1")
    for name in ("num_warps", "backward_num_warps"):
      value = getattr(self, name)
      if value is not None and value & (value - 1):
        raise ValueError(f"KernelBlocks.{name}={value} must be a power of 2")
    if self.overlap_reruns is not None and not isinstance(self.overlap_reruns, bool):
      raise ValueError(f"KernelBlocks.overlap_reruns={self.overlap_reruns!r} must be None "
                       "(auto), True or False")
    if self.value_split is not None and (
        not isinstance(self.value_split, int) or isinstance(self.value_split, bool)
        or not _is_power_of_2(self.value_split)):
      raise ValueError(f"KernelBlocks.value_split={self.value_split!r} must be None (auto) or "
                       "a power of 2 >= 1")
    if (self.value_split or 1) > 1 and self.row_lowering == "mosaic_gpu":
      raise ValueError(f"KernelBlocks.value_split={self.value_split} splits rows for the Pallas "
                       "row kernel; the Mosaic GPU row kernel takes whole 64-row states "
                       "(row_lowering='mosaic_gpu')")
    for name in ("hidden_slice", "tile"):
      value = getattr(self, name)
      if (not isinstance(value, int) or isinstance(value, bool) or value < 0
          or value & (value - 1)):
        raise ValueError(f"KernelBlocks.{name}={value!r} must be 0 (off) or a power of 2")
    slice_ = self.hidden_slice
    if slice_ and self.layout == "features":
      raise ValueError(f"KernelBlocks.hidden_slice={slice_} streams a token-major state; "
                       f"layout={self.layout!r} needs hidden_slice=0")
    if self.row_lowering == "mosaic_gpu" and (self.layout == "tokens" or slice_):
      raise ValueError(f"KernelBlocks.row_lowering='mosaic_gpu' runs the \"features\" layout "
                       f"with the state carried whole; got layout={self.layout!r}, "
                       f"hidden_slice={slice_}")

  @classmethod
  def from_spec(cls, spec: str) -> "KernelBlocks":
    """'default' or 'field=value+field=value' (integer fields; backward, layout and the
    lowerings take a name), as the benchmark's --kernel_blocks flag writes them."""
    if spec == "default":
      return cls()
    named = ("backward", "layout", "tile_lowering", "row_lowering", "reverse_lowering")
    converters = {name: (str, "a name") if name in named else (natural, "an integer")
                  for name in cls.__dataclass_fields__}
    converters["overlap_reruns"] = (boolean, "true or false")
    fields = parse_fields(spec.split("+"), converters, f"KernelBlocks spec {spec!r}")
    return cls(**fields)

  def resolved_layout(self, model_kind: str, driver: str) -> str:
    """The step's layout: `layout`, or for None the measured choice per model and driver."""
    if self.layout is not None:
      return self.layout
    if self.row_lowering == "mosaic_gpu":
      return "features"
    measured = model_kind == "linear" and driver == "chunk_loop" and not self.hidden_slice
    return "features" if measured else "tokens"

  def state_budget(self, driver: str) -> int:
    """max_state_bytes, or the driver's default."""
    return self.max_state_bytes or DRIVER_BUDGETS[driver][0]

  def activation_budget(self, driver: str) -> int:
    """max_chunk_activations, or the driver's default."""
    return self.max_chunk_activations or DRIVER_BUDGETS[driver][1]

  def checkpoint_spacing(self, num_chunks: int, chunk_state_bytes: int = 0,
                         copy_bytes: int = 0) -> int:
    """Chunks per saved state for rows of num_chunks chunks (>= 1). chunk_state_bytes: one
    chunk-start state of every row (float32); copy_bytes: their compute-dtype copies, which
    the forward saves beside them at a spacing of 1. Only 1 and round(sqrt(N)) are picked: a
    spacing of 2 ran the Titans mlp op at 32K in 82.5 ms against 46.4 at sqrt(N) and ~45 at 1
    (each group is a step of the backward's scan; docs/kernel_notes.md v26)."""
    if self.save_every is not None:
      return self.save_every
    budget = self.max_saved_bytes or saved_states_budget()
    if budget is not None and num_chunks * (chunk_state_bytes + copy_bytes) <= budget:
      return 1
    return max(1, round(num_chunks ** 0.5))


SAVED_STATES_FRACTION = 1 / 4
_SAVED_STATES_SHARERS = contextvars.ContextVar("saved_states_sharers", default=1)


@contextlib.contextmanager
def saved_states_shared_by(calls: int):
  """Trace inside this where `calls` memory ops' saved states are alive together in the
  backward pass (a model's memory layers without block remat): each op's default budget is
  then 1 / calls of SAVED_STATES_FRACTION of the device's memory."""
  if not isinstance(calls, int) or calls < 1:
    raise ValueError(f"calls={calls!r} must be an integer >= 1")
  token = _SAVED_STATES_SHARERS.set(calls)
  try:
    yield
  finally:
    _SAVED_STATES_SHARERS.reset(token)


def saved_states_budget() -> int | None:
  """KernelBlocks.max_saved_bytes' default: SAVED_STATES_FRACTION of the target device's memory
  limit over the ops that share it (saved_states_shared_by), None where JAX reports no limit.
  Measured on an H100 (docs/kernel_notes.md v26): the small TNT {8} LM's step with block remat
  289.6 -> 248.7 ms with every chunk saved (9 GiB a layer) against the sqrt(N) spacing."""
  limit = target_memory_bytes()
  if limit is None:
    return None
  return int(limit * SAVED_STATES_FRACTION) // _SAVED_STATES_SHARERS.get()


def rerun_groups(blocks: KernelBlocks, *, rows: int, programs_per_row: int, shared: int,
                 full_groups: int, compiled_gpu: bool) -> int:
  """Checkpoint groups the fused backward re-runs in one launch: KernelBlocks.rerun_groups, or
  for None as many as fill the GPU's SMs with rows x programs_per_row programs each (a
  cluster's 4 programs per row for the Mosaic GPU mlp), at most full_groups (the whole groups
  of `save_every` chunks). 1 where value_split shares q, k and the gates between rows (shared >
  1: stacked groups would break the kernel's row // split map) and, for None, off the compiled
  GPU."""
  if shared > 1 or full_groups <= 1:
    return 1
  if blocks.rerun_groups is not None:
    return min(blocks.rerun_groups, full_groups)
  cores = _usable_cores(programs_per_row) if compiled_gpu else 0
  if not cores:
    return 1
  return max(1, min(full_groups, cores // (rows * programs_per_row)))


def overlapped_rerun_groups(blocks: KernelBlocks, *, rows: int, programs_per_row: int,
                            shared: int, full_groups: int, compiled_gpu: bool,
                            fusible: bool) -> int:
  """Checkpoint groups re-run beside each walk of the fused backward (KernelBlocks.
  overlap_reruns), or 0 to re-run, then walk (`rerun_groups`). fusible: the walk and the
  re-run can share a launch (the Mosaic GPU mlp kernels). Auto: on where fusible, compiled on
  the GPU and the walk's rows x programs_per_row programs leave SMs for at least one group's
  re-run; `rerun_groups()` groups per launch. Never with value_split's shared rows, nor with
  fewer than two groups (nothing to overlap)."""
  if shared > 1 or full_groups < 1 or blocks.overlap_reruns is False:
    return 0
  programs = rows * programs_per_row
  spare = _usable_cores(programs_per_row) - programs if compiled_gpu else 0
  if blocks.overlap_reruns is None and not (fusible and compiled_gpu and spare >= programs):
    return 0
  # As many groups as fill the SMs on their own (`rerun_groups`): beside the walk they re-run in
  # up to two waves, still within the walk of as many groups (notes v20).
  return rerun_groups(blocks, rows=rows, programs_per_row=programs_per_row, shared=shared,
                      full_groups=full_groups, compiled_gpu=compiled_gpu)


def _usable_cores(programs_per_row: int) -> int:
  """The compiled GPU's SMs that take programs of clusters of programs_per_row (0 unknown)."""
  cores = target_core_count() or 0
  if programs_per_row > 1:
    # A cluster is placed within one GPC (16-18 SMs on an H100), so each GPC's leftover SMs
    # take none: count 15 of every 16 (132 SMs take 32 clusters of 4, not 33).
    cores -= cores // 16
  return cores


def _is_power_of_2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


# Triton's dot needs every dimension >= 16: the GPU driver pads each chunk to this many tokens.
MIN_GPU_CHUNK = 16

# Steps of _rows_backward_pipelined's scan per loop iteration where the re-runs share the walk's
# launch. With one, that launch reads the carried states (the walk) while writing the next step's
# (the re-run), so XLA copies its result into the loop's carry every step (notes v20: 2.6 ms of
# 50 for the Titans mlp op at 32K). With two, the second launch writes the carry's buffer after
# the first has read it, so nothing is copied.
PIPELINE_UNROLL = 2


def kernel_chunk(chunk_size: int, driver: str) -> int:
  """Tokens per chunk inside the kernel. The GPU driver pads a chunk to the next power of 2 >= 16
  with tokens whose gates are the identity (no update, no decay; their reads are dropped), which
  leaves every real token's output and the state exactly as unpadded; padding costs compute."""
  if driver != "chunk_loop":
    return chunk_size
  return max(MIN_GPU_CHUNK, 1 << (chunk_size - 1).bit_length())


def row_chunk(chunk_size: int, driver: str, blocks: KernelBlocks) -> int:
  """Tokens per chunk in the row kernel: kernel_chunk, padded as on the GPU driver whenever the
  forward runs on Mosaic GPU (its wgmma tiles take 16, 32 or 64 tokens)."""
  mosaic = blocks.row_lowering == "mosaic_gpu"
  return kernel_chunk(chunk_size, "chunk_loop" if mosaic else driver)


def rows_blocks(config: MemoryConfig, head_dim: int, dtype, *, driver: str, interpret: bool,
                blocks: KernelBlocks) -> tuple[KernelBlocks, str | None]:
  """The blocks the row kernel runs this op with, and why the Mosaic GPU row kernel does not
  take it (None where it does or was not asked for): row_lowering="mosaic_gpu" stays where
  that kernel takes the op; elsewhere row_lowering becomes "pallas" (the reverse walk with it).
  "auto" resolves here (see KernelBlocks), and its refusals are not reported."""
  if blocks.row_lowering == "auto":
    choice = "mosaic_gpu" if _mosaic_rows_measured_faster(config, driver, interpret,
                                                          blocks) else "pallas"
    blocks, _ = rows_blocks(config, head_dim, dtype, driver=driver, interpret=interpret,
                            blocks=dataclasses.replace(blocks, row_lowering=choice))
    return blocks, None
  if blocks.row_lowering != "mosaic_gpu" or uses_tiles(config, head_dim, driver, blocks):
    return blocks, None
  from tnt_jax.kernels import chunk_rows_mgpu
  reason = chunk_rows_mgpu.unsupported_reason(
      config, head_dim, dtype, row_chunk(config.chunk_size, driver, blocks),
      compiled=not interpret)
  if reason is None:
    return blocks, None
  return dataclasses.replace(blocks, row_lowering="pallas", reverse_lowering=""), reason


def _mosaic_rows_measured_faster(config: MemoryConfig, driver: str, interpret: bool,
                                 blocks: KernelBlocks) -> bool:
  """Where row_lowering="auto" picks the Mosaic GPU row kernel: compiled on a Hopper GPU, a
  linear memory with the cumulative read (its chunk-start read at C = 16 was 5% slower there:
  docs/kernel_notes.md v13) or a 2-layer mlp with either read (v17), in the layout that kernel
  runs."""
  if (interpret or driver != "chunk_loop" or blocks.layout == "tokens" or blocks.hidden_slice
      or (blocks.value_split or 1) > 1):
    return False
  kind = config.model.kind
  if not (kind == "mlp" or (kind == "linear" and config.read == "cumulative")):
    return False
  from tnt_jax.kernels.chunk_start_mgpu import hopper_reason
  return hopper_reason("row kernels") is None


@functools.lru_cache(maxsize=None)
def _log_pallas_rows(reason: str) -> None:
  logging.warning("KernelBlocks.row_lowering='mosaic_gpu': the Pallas row kernel runs this op "
                  "instead: %s", reason)


def uses_tiles(config: MemoryConfig, head_dim: int, driver: str, blocks: KernelBlocks) -> bool:
  """Whether the op runs on the chunk-start tile kernel (kernels/chunk_start.py) rather than the
  row kernel: a chunk-start read whose chunk is past the row kernel's activation limit, with
  KernelBlocks.tile set (opt-in)."""
  if config.read != "chunk_start" or not blocks.tile:
    return False
  widest = max(max(shape) for shape in config.model.layer_shapes(head_dim).values())
  return kernel_chunk(config.chunk_size, driver) * widest > blocks.activation_budget(driver)


def value_split(config: MemoryConfig, head_dim: int, driver: str, blocks: KernelBlocks, *,
                dtype=jnp.bfloat16, interpret: bool = False, rows: int | None = None) -> int:
  """Rows per (batch, head) row in the row kernel: KernelBlocks.value_split for a linear memory
  on the row kernel, 1 elsewhere (an mlp's hidden layer couples its output features; the tile
  kernel maps tokens, not rows), so one setting serves every memory of a model.

  None (auto) splits where it was measured faster (H100, 32K, docs/kernel_notes.md v16): a
  linear memory with head_dim >= 128 on the compiled GPU Pallas row kernel, into rows of 32
  output features, or of 16 where that leaves fewer rows than the GPU has SMs (rows: the op's
  batch x heads, None if not known). At d = 64 splitting was slower (a TNT memory 13.0 against
  10.8 ms), so it stays whole there."""
  if config.model.kind != "linear" or uses_tiles(config, head_dim, driver, blocks):
    return 1
  if blocks.value_split is not None:
    return blocks.value_split
  if interpret or driver != "chunk_loop" or head_dim < 128:
    return 1
  resolved, _ = rows_blocks(config, head_dim, dtype, driver=driver, interpret=interpret,
                            blocks=blocks)
  if resolved.row_lowering == "mosaic_gpu":
    return 1
  split = head_dim // 32
  cores = target_core_count()
  if rows is not None and cores and rows * split < cores:
    split = head_dim // 16
  return split


def sliced_width(model, head_dim: int, blocks: KernelBlocks) -> int:
  """Hidden units per slice when the state is streamed from memory (0: carried as a value)."""
  if model.kind != "mlp" or model.depth != 2 or not blocks.hidden_slice:
    return 0
  return min(blocks.hidden_slice, model.hidden_dim(head_dim))


def unsupported_reason(config: MemoryConfig, head_dim: int, dtype, *, driver: str,
                       interpret: bool, blocks: KernelBlocks = KernelBlocks()) -> str | None:
  """Why the kernel cannot run this op (None when it can). Shapes and config only."""
  model, rule = config.model, config.rule
  if model.kind not in ("linear", "mlp", "swiglu"):
    return f"memory model kind={model.kind!r} (the kernel does linear, mlp and swiglu)"
  if model.bias or model.residual_norm:
    return (f"bias={model.bias}, residual_norm={model.residual_norm} (TTT's bias and "
            "LayerNorm are not in the kernel)")
  if rule.kind not in ("gd", "titans"):
    return f"rule={rule.kind!r} (the kernel does gd and titans)"
  tiled = uses_tiles(config, head_dim, driver, blocks)
  if tiled and blocks.tile_lowering == "mosaic_gpu":
    from tnt_jax.kernels import chunk_start_mgpu
    return chunk_start_mgpu.unsupported_reason(model, head_dim, dtype, compiled=not interpret)
  if not tiled:
    blocks, _ = rows_blocks(config, head_dim, dtype, driver=driver, interpret=interpret,
                            blocks=blocks)
    if blocks.row_lowering == "mosaic_gpu" and model.kind == "linear":
      return None        # the backward runs the Pallas reverse kernel where its walk does not fit
    if (blocks.row_lowering == "mosaic_gpu"
        and (blocks.reverse_lowering or blocks.row_lowering) == "mosaic_gpu"):
      from tnt_jax.kernels import chunk_rows_mgpu_mlp_reverse
      if chunk_rows_mgpu_mlp_reverse.unsupported_reason(
          config, head_dim, dtype, row_chunk(config.chunk_size, driver, blocks),
          compiled=not interpret) is None:
        return None
    # Else an mlp's backward is the Pallas reverse kernel's: its rules below apply.
  width = 0 if tiled else sliced_width(model, head_dim, blocks)
  shapes = model.layer_shapes(head_dim)
  split = value_split(config, head_dim, driver, blocks, dtype=dtype, interpret=interpret)
  if head_dim % split:
    return (f"KernelBlocks.value_split={split} does not divide head_dim={head_dim} (each split "
            "row holds head_dim / value_split output features)")
  shapes = {name: (o // split, i) for name, (o, i) in shapes.items()}
  if width:
    hidden = model.hidden_dim(head_dim)
    if hidden % width:
      return f"KernelBlocks.hidden_slice={width} does not divide the mlp's hidden width {hidden}"
    shapes = {name: (width, head_dim) for name in shapes}     # one slice of each layer
  what = f"state of a {width}-unit hidden slice" if width else "per-row state"
  state_bytes = sum(o * i for o, i in shapes.values()) * 4
  state_bytes *= 2 if rule.has_momentum else 1
  state_budget, activation_budget = blocks.state_budget(driver), blocks.activation_budget(driver)
  if state_bytes > state_budget:
    return (f"the {what} is {state_bytes} bytes > KernelBlocks.max_state_bytes="
            f"{state_budget} (head_dim={head_dim}, expansion={model.expansion})")
  if not interpret:
    # float32 operands take twice a bf16 operand's on-chip staging; measured on an H100, a
    # 128 KiB titans state in float32 asks for 241 KiB of shared memory (> 227 KiB).
    f32_limit = state_budget // 4
    if (driver == "chunk_loop" and jnp.dtype(dtype) == jnp.dtype(jnp.float32)
        and state_bytes > f32_limit):
      return (f"the {what} is {state_bytes} bytes > {f32_limit} "
              "(KernelBlocks.max_state_bytes / 4 for float32 compute)")
    widest = max(max(shape) for shape in shapes.values())
    chunk = kernel_chunk(config.chunk_size, driver)
    if not tiled and chunk * widest > activation_budget:
      padded = f" (padded from {config.chunk_size})" if chunk != config.chunk_size else ""
      opt_in = (" KernelBlocks.tile > 0 runs it on the tile kernel, measured no faster"
                if config.read == "chunk_start" else "")
      return (f"chunk_size={chunk}{padded} x widest layer {widest} > KernelBlocks."
              f"max_chunk_activations={activation_budget} (large chunks are XLA's "
              f"batched matmuls;{opt_in or ' the row kernel holds a chunk in registers'})")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
      return f"dtype={jnp.dtype(dtype).name} (compiled kernels take float32 or bfloat16)"
    if driver == "chunk_loop":
      sizes = {"head_dim": head_dim}      # the chunk is padded (kernel_chunk)
      if split > 1:
        sizes["head_dim / KernelBlocks.value_split"] = head_dim // split
      sizes.update({f"{name}.out": o for name, (o, _) in model.layer_shapes(head_dim).items()})
      if width:
        sizes["hidden_slice"] = width
      if tiled:
        from tnt_jax.kernels.chunk_start import tile_size    # it imports this module
        sizes["tile"] = tile_size(config.chunk_size, blocks, driver)
      for name, size in sizes.items():
        if not _is_power_of_2(size) or size < 16:
          return (f"{name}={size}: the GPU lowering needs powers of 2 >= 16 for every matmul "
                  "dimension")
  return None


class ChunkCoefs(NamedTuple):
  """Per (row, chunk) gate coefficients, 2-D so each broadcasts against a [C, d] block.

  read_w0, read_s0 [C, 1], read_x [C, C]: cumulative read (None for chunk_start).
  end_w0, end_s0, end_ss0 [1, 1]; end_x, end_sx [C, 1]: the chunk-end state update.
  Momentum terms are None for the gd rule.
  """
  read_w0: Array | None
  read_s0: Array | None
  read_x: Array | None
  end_w0: Array
  end_s0: Array | None
  end_x: Array
  end_ss0: Array | None
  end_sx: Array | None


def _chunk_step(weights: list, momentum: list | None, q, k, v, c: ChunkCoefs, *,
                config: MemoryConfig, compute_dtype, layout: str = "tokens"):
  """One chunk of one row. weights/momentum: [out, in] float32 per layer (in layer order);
  q, k, v: [C, d] ("tokens" layout) or [d, C] ("features"; the coefficients then transposed,
  `coefs_in_layout`). Returns (weights', momentum', out float32 in the layout of q)."""
  acc = jnp.promote_types(compute_dtype, jnp.float32)
  lay = ChunkLayout(layout, compute_dtype)
  graph = model_graph(config.model)
  loss_grad = loss_gradient(config, v.astype(acc))
  # Keys: forward at W0 and back: per layer its input a_i and delta_i = d loss / d (its output),
  # so that the layer's gradient is delta_i^T a_i.
  inputs, deltas = graph(weights, k.astype(acc), None, lay, config.model.activation, loss_grad)

  # Read: each layer's pre-activation at the reader's own state W_t (dual form, cumulative) or
  # at W0 (chunk_start), through the same graph.
  def layer_read(i, x):
    if config.read != "cumulative":
      return lay.apply(weights[i], x)
    z = c.read_w0 * lay.apply(weights[i], x)
    if momentum is not None:
      z = z + c.read_s0 * lay.apply(momentum[i], x)
    scores = c.read_x * lay.scores(x, inputs[i])
    return z + lay.mix(scores, deltas[i])

  out = graph(weights, q.astype(acc), layer_read, lay, config.model.activation, None)

  # Update: sum_j coef_j delta_j a_j^T.
  outer = lambda coef, i: lay.outer(coef * deltas[i], inputs[i])
  new_weights, new_momentum = [], None if momentum is None else []
  for i, w in enumerate(weights):
    w1 = c.end_w0 * w + outer(c.end_x, i)
    if momentum is not None:
      w1 = w1 + c.end_s0 * momentum[i]
      new_momentum.append(c.end_ss0 * momentum[i] + outer(c.end_sx, i))
    new_weights.append(w1)
  return new_weights, new_momentum, out


def model_graph(model):
  """The memory model's keys/read graph (`_chain_graph` or `_swiglu_graph`)."""
  return _swiglu_graph if model.kind == "swiglu" else _chain_graph


def loss_gradient(config: MemoryConfig, v):
  """d loss / d y for the chunk's values v (float32+): the l2 loss |y - v|^2 or the dot loss."""
  return (lambda y: 2.0 * (y - v)) if config.loss == "l2" else (lambda y: -v)


def _chain_graph(weights, x, layer_read, lay, act, loss_grad):
  """linear / mlp: layer i takes act(layer i-1's output). With layer_read None, the keys' pass:
  returns (inputs, deltas); else the read: layer_read(i, x) gives layer i's pre-activation and
  the output is returned."""
  depth = len(weights)
  inputs, pre = [], []
  for i, w in enumerate(weights):
    inputs.append(x)
    z = lay.apply(w, x) if layer_read is None else layer_read(i, x)
    pre.append(z)
    x = _act_and_grad(act, z)[0] if i < depth - 1 else z
  if layer_read is not None:
    return x
  deltas = [None] * depth
  delta = loss_grad(x)
  for i in reversed(range(depth)):
    deltas[i] = delta
    if i:
      delta = lay.apply_transposed(weights[i], delta) * _act_and_grad(act, pre[i - 1])[1]
  return inputs, deltas


def _swiglu_graph(weights, x, layer_read, lay, act, loss_grad):
  """swiglu, layers (w1, w3, w2): w2 [silu(w1 x) * (w3 x)] (memory/models.py; silu whatever
  `act` says). The same contract as `_chain_graph`."""
  del act
  pre = (lambda i: lay.apply(weights[i], x)) if layer_read is None else (
      lambda i: layer_read(i, x))
  gate, up = pre(0), pre(1)
  silu, silu_grad = _act_and_grad("silu", gate)
  hidden = silu * up
  y = lay.apply(weights[2], hidden) if layer_read is None else layer_read(2, hidden)
  if layer_read is not None:
    return y
  dy = loss_grad(y)
  d_hidden = lay.apply_transposed(weights[2], dy)
  return [x, x, hidden], [d_hidden * up * silu_grad, d_hidden * silu, dy]


def coefs_in_layout(coefs: ChunkCoefs, layout: str) -> ChunkCoefs:
  """The coefficients as `_chunk_step` takes them in this layout: per-token columns [.., C, 1]
  become rows [.., 1, C] and the read's score weights [t, j] become [j, t] for "features"."""
  if layout == "tokens":
    return coefs
  swap = lambda x: None if x is None else jnp.swapaxes(x, -1, -2)
  return coefs._replace(read_w0=swap(coefs.read_w0), read_s0=swap(coefs.read_s0),
                        read_x=swap(coefs.read_x), end_x=swap(coefs.end_x),
                        end_sx=swap(coefs.end_sx))


# ----------------------------------------------------------------------------- layout


def _rows(x_BxTxHx_, num_chunks, chunk):
  """[B, T, H, ...] -> [B*H, N, C, ...], zero-padded at the end of T."""
  b, t, h = x_BxTxHx_.shape[:3]
  pad = num_chunks * chunk - t
  if pad:
    x_BxTxHx_ = jnp.pad(x_BxTxHx_, [(0, 0), (0, pad)] + [(0, 0)] * (x_BxTxHx_.ndim - 2))
  x = jnp.moveaxis(x_BxTxHx_, 2, 1)
  return x.reshape((b * h, num_chunks, chunk) + x.shape[3:])


@jax.custom_vjp
def _unfused_cotangent(x):
  """x; its cotangent passes an optimization barrier. Put after a layout change whose backward
  (a transpose) XLA would otherwise fuse with the reduction that makes the cotangent: on an H100
  that fusion read the coefficients' [R, N, C, C+1] gradients uncoalesced, 0.96 ms of a 9.8 ms
  TNT step at 32K, against tens of microseconds for the two kernels apart."""
  return x


_unfused_cotangent.defvjp(lambda x: (x, None),
                          lambda _, ct: (jax.lax.optimization_barrier(ct),))


def _pad_chunks(x_RxNxCx_, padded_chunk, value=0):
  """Pad axis 2 (tokens in a chunk) at its end to padded_chunk."""
  pad = padded_chunk - x_RxNxCx_.shape[2]
  if not pad:
    return x_RxNxCx_
  return jnp.pad(x_RxNxCx_, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x_RxNxCx_.ndim - 3),
                 constant_values=value)


def chunk_coefficients(gates: Gates, config: MemoryConfig, length: int, acc,
                       padded_chunk: int | None = None) -> ChunkCoefs:
  """The gate coefficients of every (row, chunk), laid out [B*H, N, ...] for the kernel; with
  padded_chunk, each chunk is padded at its end with identity tokens to that many."""
  chunk = config.chunk_size
  padded_chunk = padded_chunk or chunk
  n = -(-length // chunk)
  valid = _pad_chunks((jnp.arange(n * chunk) < length).reshape(1, n, chunk), padded_chunk,
                      False)
  rows = lambda g: None if g is None else _pad_chunks(
      _unfused_cotangent(_rows(g.astype(acc), n, chunk)), padded_chunk)   # [BH, N, C]
  c = transitions.gate_coefficients(rows(gates.theta), rows(gates.eta), rows(gates.alpha),
                                    valid, config.read)
  has_s = config.rule.has_momentum
  col = lambda x: x[..., :, None]                                      # [..., C] -> [..., C, 1]
  one = lambda x: x[..., None, None]                                   # [...] -> [..., 1, 1]
  if config.read == "cumulative":
    return ChunkCoefs(
        read_w0=col(c.w_from_w0), read_s0=col(c.w_from_s0) if has_s else None,
        read_x=c.w_from_x, end_w0=one(c.w_from_w0[..., -1]),
        end_s0=one(c.w_from_s0[..., -1]) if has_s else None, end_x=col(c.w_from_x[..., -1, :]),
        end_ss0=one(c.s_from_s0) if has_s else None, end_sx=col(c.s_from_x) if has_s else None)
  return ChunkCoefs(
      read_w0=None, read_s0=None, read_x=None, end_w0=one(c.w_from_w0),
      end_s0=one(c.w_from_s0) if has_s else None, end_x=col(c.w_from_x),
      end_ss0=one(c.s_from_s0) if has_s else None, end_sx=col(c.s_from_x) if has_s else None)


def _state_rows(tree_layers: dict, names, acc):
  """{layer: {"w": [B, H, o, i]}} -> [B*H, o, i] per layer, in layer order."""
  return [tree_layers[n]["w"].astype(acc).reshape((-1,) + tree_layers[n]["w"].shape[2:])
          for n in names]


# ----------------------------------------------------------------------------- drivers


class _ChunkView:
  """Chunk j of a row ref, indexed like the chunk itself (j None: the ref is the chunk block)."""

  def __init__(self, ref, j):
    self.ref, self.j = ref, j
    self.dtype = ref.dtype

  def _at(self, index):
    index = index if isinstance(index, tuple) else (index,)
    if self.j is None:
      return index
    return (self.j,) if index == (Ellipsis,) else (self.j,) + index

  def __getitem__(self, index):
    return self.ref[self._at(index)]

  def __setitem__(self, index, value):
    self.ref[self._at(index)] = value


def _copy_state(dst_refs, src_refs, sync):
  """dst[...] = src[...] per ref, a band of rows at a time (a whole state as one value spills)."""
  for dst, src in zip(dst_refs, src_refs):
    rows, cols = src.ref.shape[-2:] if isinstance(src, _ChunkView) else src.shape[-2:]
    band = min(rows, max(1, 4096 // cols))
    for start in range(0, rows, band):
      index = (pl.ds(start, min(band, rows - start)), slice(None))
      dst[index] = src[index].astype(dst.dtype)
  sync()


def _sequential_call(body, chunk_inputs, carry_init, chunk_out_shapes, *, reverse, driver,
                     interpret, gpu_params, name, snapshot_every=None, carry_in_refs=False,
                     sync=lambda: None, shared_rows=1):
  """One program per row walks that row's chunks in order (or reversed), carrying state on chip.

  chunk_inputs: arrays [R, N, ...] read one chunk at a time; carry_init: arrays [R, ...], the
  carry's start; chunk_out_shapes: ShapeDtypeStructs [R, N, ...] written one chunk at a time.
  shared_rows=s: a chunk input with R / s rows is shared by s consecutive programs (program i
  reads its row i // s: KernelBlocks.value_split's rows read one copy of q, k and the gates).
  body(carry: list, chunk_values: list) -> (carry, chunk_outputs). snapshot_every=s (forward
  only) also returns the carry at the start of chunks 0, s, 2s, ... ([R, ceil(N / s), ...]).
  Returns (chunk_outputs, final carry, snapshots) as lists (snapshots [] without s).

  carry_in_refs: the carry lives in the final-carry output refs instead of values, and
  body(carry_refs, chunk_views: list[_ChunkView]) -> chunk_outputs updates it in place (loading
  what it needs when it needs it); sync() runs after every chunk and state copy.
  """
  rows, n = carry_init[0].shape[0], chunk_inputs[0].shape[1]
  divisors = []
  for x in chunk_inputs:
    if x.shape[0] not in (rows, rows // shared_rows) or rows % shared_rows:
      raise ValueError(f"a chunk input has {x.shape[0]} rows; expected {rows} or {rows} / "
                       f"shared_rows={shared_rows}")
    divisors.append(1 if x.shape[0] == rows else shared_rows)
  if snapshot_every is not None and reverse:
    raise ValueError("carry snapshots are taken walking forward only")
  num_in, num_carry = len(chunk_inputs), len(carry_init)
  num_chunk_out = len(chunk_out_shapes)
  carry_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in carry_init]
  snap_shapes = []
  if snapshot_every is not None:
    slots = -(-n // snapshot_every)
    snap_shapes = [jax.ShapeDtypeStruct((x.shape[0], slots) + x.shape[1:], x.dtype)
                   for x in carry_init]
  out_shape = list(chunk_out_shapes) + carry_shapes + snap_shapes

  def split_refs(refs):
    """(chunk inputs, carry inits, chunk outputs, final carry, snapshots)."""
    bounds = [num_in, num_carry, num_chunk_out, num_carry, len(snap_shapes)]
    groups, at = [], 0
    for size in bounds:
      groups.append(refs[at:at + size])
      at += size
    return groups

  def store(refs, index, values):
    for r, val in zip(refs, values):
      r[index] = val.astype(r.dtype)

  if driver == "sequential_grid":
    def kernel(*refs):
      chunk_refs, init_refs, out_refs, carry_refs, snap_refs = split_refs(refs)
      j = pl.program_id(1)

      @pl.when(j == 0)
      def _():
        if carry_in_refs:
          _copy_state(carry_refs, init_refs, sync)
        else:
          store(carry_refs, ..., [r[...] for r in init_refs])

      if carry_in_refs:
        if snap_refs:
          pl.when(j % snapshot_every == 0)(lambda: _copy_state(snap_refs, carry_refs, sync))
        store(out_refs, ..., body(carry_refs, [_ChunkView(r, None) for r in chunk_refs]))
        return
      carry = [r[...] for r in carry_refs]
      if snap_refs:   # the slot's block stays resident over its stride: write it once
        pl.when(j % snapshot_every == 0)(lambda: store(snap_refs, ..., carry))
      carry, outs = body(carry, [r[...] for r in chunk_refs])
      store(out_refs, ..., outs)
      store(carry_refs, ..., carry)

    def chunk_spec(shape, stride=1, share=1):
      at = ((lambda i, j: (i // share, n - 1 - j)) if reverse
            else (lambda i, j: (i // share, j // stride)))
      return pl.BlockSpec((None, None) + tuple(shape[2:]),
                          lambda i, j: at(i, j) + (0,) * (len(shape) - 2))

    row_spec = lambda shape: pl.BlockSpec((None,) + tuple(shape[1:]),
                                          lambda i, j: (i,) + (0,) * (len(shape) - 1))
    in_specs = [chunk_spec(x.shape, share=g) for x, g in zip(chunk_inputs, divisors)]
    in_specs += [row_spec(x.shape) for x in carry_init]
    out_specs = [chunk_spec(o.shape) for o in chunk_out_shapes]
    out_specs += [row_spec(o.shape) for o in carry_shapes]
    out_specs += [chunk_spec(o.shape, snapshot_every) for o in snap_shapes]
    grid = (rows, n)
    compiler_params = None
    if interpret is not True:   # compiled for TPU, or the TPU interpreter (InterpretParams)
      from jax.experimental.pallas import tpu as pltpu
      compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
  elif driver == "chunk_loop":
    def kernel(*refs):
      chunk_refs, init_refs, out_refs, carry_refs, snap_refs = split_refs(refs)

      def walk(first, count, carry):
        """Chunks first .. first + count - 1 (count static) in the walking order."""
        def step(i, carry):
          j = n - 1 - (first + i) if reverse else first + i
          if carry_in_refs:
            store(out_refs, j, body(carry_refs, [_ChunkView(r, j) for r in chunk_refs]))
            sync()
          else:
            carry, outs = body(carry, [r[j] for r in chunk_refs])
            store(out_refs, j, outs)
          return carry
        return jax.lax.fori_loop(0, count, step, carry)

      if carry_in_refs:
        _copy_state(carry_refs, init_refs, sync)
        carry = ()          # the state is in carry_refs
      else:
        carry = [r[...] for r in init_refs]
      save = lambda g, carry: (
          _copy_state([_ChunkView(r, g) for r in snap_refs], carry_refs, sync) if carry_in_refs
          else store(snap_refs, g, carry))
      if not snap_refs:
        carry = walk(0, n, carry)
      else:
        # Snapshots by loop structure, not a per-chunk branch (Triton's lowering rejects a
        # condition on the loop index): groups of s chunks, each snapshotted at its start,
        # then the shorter last group.
        s = snapshot_every
        full, tail = divmod(n, s)

        def group(g, carry):
          save(g, carry)
          return walk(g * s, s, carry)

        if full:
          carry = jax.lax.fori_loop(0, full, group, carry)
        if tail:
          save(full, carry)
          carry = walk(full * s, tail, carry)
      if not carry_in_refs:
        store(carry_refs, ..., carry)

    whole_row = lambda shape, share=1: pl.BlockSpec(
        (None,) + tuple(shape[1:]), lambda i: (i // share,) + (0,) * (len(shape) - 1))
    in_specs = [whole_row(x.shape, g) for x, g in zip(chunk_inputs, divisors)]
    in_specs += [whole_row(x.shape) for x in carry_init]
    out_specs = [whole_row(o.shape) for o in out_shape]
    grid = (rows,)
    compiler_params = None
    if not interpret:
      from jax.experimental.pallas import triton as pltriton
      compiler_params = pltriton.CompilerParams(**gpu_params)
  else:
    raise ValueError(f"driver={driver!r} is unknown; expected one of {DRIVERS}")

  results = pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
                           out_specs=out_specs, compiler_params=compiler_params,
                           interpret=interpret, name=name)(*chunk_inputs, *carry_init)
  results = list(results)
  final_at = num_chunk_out + num_carry
  return results[:num_chunk_out], results[num_chunk_out:final_at], results[final_at:]


def _shared_rows(q, v) -> int:
  """How many programs share each row of q (KernelBlocks.value_split: v has that many rows per
  row of q, k and the gate coefficients)."""
  return v.shape[0] // q.shape[0]


def _sum_shared_rows(grads_RsxN_, split):
  """Per-program gradients of a shared input [R * split, N, ...] summed to [R, N, ...] (in
  float32 at least, then in the input's dtype)."""
  acc = jnp.promote_types(grads_RsxN_.dtype, jnp.float32)
  total = grads_RsxN_.reshape((-1, split) + grads_RsxN_.shape[1:]).astype(acc).sum(axis=1)
  return total.astype(grads_RsxN_.dtype)


class _Static(NamedTuple):
  """The hashable, non-differentiable arguments of the row-level kernel op (the launch fields
  are unused by the jnp reference)."""
  config: MemoryConfig
  coef_fields: tuple
  depth: int
  has_momentum: bool
  driver: str = ""
  interpret: object = True
  blocks: KernelBlocks = KernelBlocks()

  @property
  def layout(self) -> str:
    """The chunk step's activation layout (kernel_memory resolves KernelBlocks.layout first;
    the jnp reference runs "tokens")."""
    return self.blocks.layout or "tokens"


def _carry_step(static: _Static, compute_dtype):
  """The chunk step on a flat carry [W layers..., S layers...] and flat coefficient values:
  (carry, q, k, v, coef_values) -> (carry', out [C, d] float32)."""
  depth = static.depth

  def step(carry, q, k, v, coef_values):
    given = dict(zip(static.coef_fields, coef_values))
    coefs = ChunkCoefs(**{f: given.get(f) for f in ChunkCoefs._fields})
    momentum = list(carry[depth:]) if static.has_momentum else None
    new_w, new_s, out = _chunk_step(list(carry[:depth]), momentum, q, k, v, coefs,
                                    config=static.config, compute_dtype=compute_dtype,
                                    layout=static.layout)
    return new_w + (new_s or []), out

  return step


def _gpu_params(static, backward: bool = False) -> dict:
  """Triton launch parameters from static.blocks and static.config (the row kernel's _Static or
  the tile kernel's)."""
  num_warps = static.blocks.num_warps or (4 if static.config.model.kind == "linear" else 8)
  if backward and static.blocks.backward_num_warps:
    num_warps = static.blocks.backward_num_warps
  return dict(num_warps=num_warps, num_stages=static.blocks.num_stages)


def _sliced_step(static: _Static, head_dim: int, compute_dtype):
  """The slice-streaming chunk step (kernels/sliced_mlp.py), or None to carry the state as a
  value."""
  model = static.config.model
  width = sliced_width(model, head_dim, static.blocks)
  if not width:
    return None
  return SlicedStep(static.config, static.coef_fields, static.has_momentum, width,
                    model.hidden_dim(head_dim), compute_dtype, _sync(static))


def _sync(static: _Static):
  """A barrier across the program's threads: compiled GPU only (elsewhere a program's refs are
  read and written by one thread of control, and the interpreter has no barrier)."""
  if static.driver == "chunk_loop" and static.interpret is False:
    from jax.experimental.pallas import triton as pltriton
    return pltriton.debug_barrier
  return lambda: None


def _kernel_name(direction: str, static: _Static, sliced) -> str:
  layout = f"_sliced{sliced.width}" if sliced is not None else f"_{static.layout}"
  return f"chunk_memory_{direction}_{static.config.model.kind}_{static.config.rule.kind}{layout}"


def _rows_forward(static: _Static, q, k, v, coefs, state, *, save_every: int | None,
                  outputs: bool = True):
  """Kernel forward on the row layout: (out [R, N, C, d], final state, saved), saved being the
  start states of chunks 0, s, 2s, ... ([R, ceil(N / s), out, in] per layer) for save_every=s,
  or [] for None. outputs=False (the backward's re-runs) lets a kernel skip the output (out may
  then be None)."""
  cd = q.dtype
  if static.blocks.row_lowering == "mosaic_gpu":
    return _mosaic_rows_forward(static, q, k, v, coefs, state, save_every=save_every,
                                outputs=outputs)
  sliced = _sliced_step(static, q.shape[-1], cd)
  if sliced is not None:
    def body(carry_refs, chunk):
      qc, kc, vc, *coef_values = (view[...] for view in chunk)
      return [sliced.forward(carry_refs, qc, kc, vc, coef_values)]
  else:
    step = _carry_step(static, cd)

    def body(carry, chunk):
      qc, kc, vc, *coef_values = chunk
      new_carry, out = step(carry, qc, kc, vc, coef_values)
      return new_carry, [out]

  outs, final, saved = _sequential_call(
      body, [q, k, v, *coefs], list(state), [jax.ShapeDtypeStruct(v.shape, cd)], reverse=False,
      driver=static.driver, interpret=static.interpret, gpu_params=_gpu_params(static),
      snapshot_every=save_every, carry_in_refs=sliced is not None, sync=_sync(static),
      name=_kernel_name("fwd", static, sliced), shared_rows=_shared_rows(q, v))
  return outs[0], final, saved


def _mosaic_rows_forward(static: _Static, q, k, v, coefs, state, *, save_every: int | None,
                         outputs: bool = True, as_part: bool = False):
  """`_rows_forward` on the Mosaic GPU row kernel (kernels/chunk_rows_mgpu.py, or for a 2-layer
  mlp kernels/chunk_rows_mgpu_mlp.py; "features" layout, so q, k, v are [R, N, d, C]). as_part
  (the mlp only): (a `mgpu_launch.KernelPart`, the function of its results that returns what
  this returns) instead, for a launch beside the reverse walk."""
  from tnt_jax.kernels import chunk_rows_mgpu
  rows, num_chunks, _, chunk = q.shape
  packed, read_x = chunk_rows_mgpu.pack_coefficients(
      dict(zip(static.coef_fields, coefs)), rows, num_chunks, chunk)
  if static.config.model.kind == "mlp":
    from tnt_jax.kernels import chunk_rows_mgpu_mlp
    # Saving every chunk's state is for the backward: the mlp reverse walk reads E beside it.
    save_aux = save_every == 1 and _mosaic_reverse_reason(static, q) is None
    return (chunk_rows_mgpu_mlp.mlp_forward_part if as_part else
            chunk_rows_mgpu_mlp.mlp_rows_forward)(
        q, k, v, packed, read_x, list(state), activation=static.config.model.activation,
        l2=static.config.loss == "l2", save_every=save_every, interpret=static.interpret,
        save_aux=save_aux, outputs=outputs or not save_aux)
  if as_part:
    raise ValueError("only the Mosaic GPU mlp forward runs as a part of another launch")
  return chunk_rows_mgpu.linear_rows_forward(
      q, k, v, packed, read_x, list(state), l2=static.config.loss == "l2",
      save_every=save_every, interpret=static.interpret)


def _mosaic_reverse_reason(static: _Static, q) -> str | None:
  """Why the Mosaic GPU reverse walk cannot run this backward (None when it can): it runs
  whenever the forward is Mosaic GPU's and it fits; else the Pallas reverse kernel does."""
  blocks = static.blocks
  if (blocks.reverse_lowering or blocks.row_lowering) != "mosaic_gpu":
    return f"row_lowering={blocks.row_lowering!r}, reverse_lowering={blocks.reverse_lowering!r}"
  if static.config.model.kind == "mlp":
    from tnt_jax.kernels import chunk_rows_mgpu_mlp_reverse as reverse
  else:
    from tnt_jax.kernels import chunk_rows_mgpu_reverse as reverse
  return reverse.unsupported_reason(static.config, q.shape[2], q.dtype, q.shape[3],
                                    compiled=static.interpret is False)


def _mosaic_rows_backward(static: _Static, q, k, v, coefs, saved_states, d_out, d_final,
                          beside=()):
  """`_rows_backward` on the Mosaic GPU reverse walk (kernels/chunk_rows_mgpu_reverse.py, or
  for a 2-layer mlp kernels/chunk_rows_mgpu_mlp_reverse.py, whose saved_states end with what
  the forward saved for it beside the states). beside (the mlp only): `mgpu_launch.KernelPart`s
  to run in the walk's launch; their raw results are returned after the rest."""
  from tnt_jax.kernels import chunk_rows_mgpu, chunk_rows_mgpu_reverse
  rows, num_chunks, _, chunk = q.shape
  given = dict(zip(static.coef_fields, coefs))
  if static.config.model.kind == "mlp":
    from tnt_jax.kernels import chunk_rows_mgpu_mlp_reverse
    n_states = len(d_final)
    dq, dk, dv, d_coefs, d_init, others = chunk_rows_mgpu_mlp_reverse.mlp_rows_backward(
        q, k, given, list(saved_states[:n_states]), list(saved_states[n_states:]), d_out,
        list(d_final), activation=static.config.model.activation,
        l2=static.config.loss == "l2", interpret=static.interpret, beside=beside)
    grads = (dq, dk, dv.astype(v.dtype), [d_coefs[name] for name in static.coef_fields], d_init)
    return grads + (others,) if beside else grads
  if beside:
    raise ValueError("only the Mosaic GPU mlp reverse walk runs other kernels beside it")
  packed, read_x = chunk_rows_mgpu.pack_coefficients(given, rows, num_chunks, chunk)
  dq, dk, dv, products, d_read_x, d_ends, d_init = chunk_rows_mgpu_reverse.linear_rows_reverse(
      q, k, v, packed, read_x, list(saved_states), d_out, list(d_final),
      l2=static.config.loss == "l2", interpret=static.interpret)
  d_coefs = chunk_rows_mgpu_reverse.coefficient_grads(
      products, chunk_rows_mgpu_reverse.end_dots(d_ends, list(saved_states)), d_read_x, given)
  return dq, dk, dv, [d_coefs[name] for name in static.coef_fields], d_init


def _rows_backward(static: _Static, q, k, v, coefs, saved_states, d_out, d_final):
  """Fused backward: walk the chunks in reverse, the vjp of one chunk step at its saved
  chunk-start state, carrying the state's cotangent on chip."""
  if _mosaic_reverse_reason(static, q) is None:
    return _mosaic_rows_backward(static, q, k, v, coefs, saved_states, d_out, d_final)
  if static.blocks.row_lowering == "mosaic_gpu" and static.config.model.kind != "linear":
    # After the Mosaic GPU mlp forward ("features"), the Pallas reverse walk runs token-major,
    # the layout measured faster for an mlp on it (docs/kernel_notes.md v6). The saved states
    # are [out, in] in either layout; the inputs and every per-token coefficient swap axes.
    swap = lambda x: jnp.swapaxes(x, -1, -2)
    tokens = static._replace(blocks=dataclasses.replace(
        static.blocks, row_lowering="pallas", reverse_lowering="", layout="tokens"))
    dq, dk, dv, d_coefs, d_init = _rows_backward(
        tokens, swap(q), swap(k), swap(v), [swap(c) for c in coefs], saved_states, swap(d_out),
        d_final)
    return swap(dq), swap(dk), swap(dv), [swap(g) for g in d_coefs], d_init
  cd = q.dtype
  num_coefs = len(coefs)
  sliced = _sliced_step(static, q.shape[-1], cd)
  if sliced is not None:
    def sliced_body(d_carry_refs, chunk):
      qc, kc, vc, *coef_values, d_out_c = (view[...] for view in chunk[:4 + num_coefs])
      dq, dk, dv, d_coefs = sliced.backward(chunk[4 + num_coefs:], d_carry_refs, qc, kc, vc,
                                            coef_values, d_out_c)
      return [dq, dk, dv] + list(d_coefs)
  step = _carry_step(static, cd)

  def carried_body(d_carry, chunk):
    qc, kc, vc = chunk[:3]
    coef_values = chunk[3:3 + num_coefs]
    d_out_c = chunk[3 + num_coefs]
    state_c = chunk[4 + num_coefs:]

    def chunk_vjp(state, qc, kc, vc, coef_values, d_state, d_out):
      _, vjp = jax.vjp(step, state, qc, kc, vc, coef_values)
      return vjp((d_state, d_out))

    acc = jnp.promote_types(cd, jnp.float32)
    d_state, dq, dk, dv, d_coefs = _one_dtype_per_matmul(chunk_vjp)(
        list(state_c), qc, kc, vc, list(coef_values), list(d_carry), d_out_c.astype(acc))
    return d_state, [dq, dk, dv] + list(d_coefs)

  # One gradient per program: a shared input's (q, k, gates) is summed over its programs below.
  split = _shared_rows(q, v)
  rows = v.shape[0]
  out_shapes = [jax.ShapeDtypeStruct((rows,) + x.shape[1:], x.dtype) for x in (q, k, v, *coefs)]
  outs, d_init, _ = _sequential_call(
      sliced_body if sliced is not None else carried_body, [q, k, v, *coefs, d_out, *saved_states],
      list(d_final), out_shapes, reverse=True, driver=static.driver,
      interpret=static.interpret, gpu_params=_gpu_params(static, backward=True),
      carry_in_refs=sliced is not None, sync=_sync(static),
      name=_kernel_name("bwd", static, sliced), shared_rows=split)
  dq, dk, dv, *d_coefs = outs
  if split > 1:
    dq, dk, *d_coefs = (_sum_shared_rows(g, split) for g in [dq, dk, *d_coefs])
  return dq, dk, dv, d_coefs, d_init


def _rows_backward_grouped(static: _Static, q, k, v, coefs, saved, d_out, d_final, spacing):
  """The fused backward from states saved every `spacing` chunks: per group of `spacing` chunks,
  last group first, re-run the forward kernel from the group's saved state (saving every
  chunk-start state of the group), then the reverse kernel over the group. The groups run in a
  reverse lax.scan, so only one group's states are live at a time; a shorter last group (N not
  a multiple of spacing) runs first, on its own.

  `rerun_groups` consecutive groups re-run in one launch, each group's rows stacked below the
  last's ([R, g * spacing] -> [R * g, spacing], a reshape), and are walked back in one reverse
  launch; whole groups left over from a multiple of it run as one more, smaller, step."""
  if spacing == 1:
    dq, dk, dv, d_coefs, d_state = _rows_backward(static, q, k, v, coefs, saved, d_out, d_final)
    return [dq, dk, dv, *d_coefs], d_state
  n = q.shape[1]
  full = -(-n // spacing) - 1                  # whole groups before the last (maybe shorter)
  programs = 1
  if static.blocks.row_lowering == "mosaic_gpu" and static.config.model.kind == "mlp":
    from tnt_jax.kernels.chunk_rows_mgpu_mlp import UNITS
    programs = saved[0].shape[2] // UNITS                    # W1 [R, groups, hidden, d]
  compiled_gpu = static.interpret is False and target_platform() == "gpu"
  fusible = (static.blocks.row_lowering == "mosaic_gpu" and static.config.model.kind == "mlp"
             and _mosaic_reverse_reason(static, q) is None)
  beside = overlapped_rerun_groups(
      static.blocks, rows=v.shape[0], programs_per_row=programs, shared=_shared_rows(q, v),
      full_groups=full, compiled_gpu=compiled_gpu, fusible=fusible)
  if beside:
    return _rows_backward_pipelined(static, q, k, v, coefs, saved, d_out, d_final, spacing,
                                    beside, fusible)
  per_launch = rerun_groups(
      static.blocks, rows=v.shape[0], programs_per_row=programs, shared=_shared_rows(q, v),
      full_groups=full, compiled_gpu=compiled_gpu)
  chunked = [q, k, v, *coefs, d_out]

  def groups(starts, d_carry, arrays):
    """Re-run starts' g groups in one launch, then walk them back: starts [R, g, ...] per state
    leaf, arrays [R, g * L, ...]."""
    qg, kg, vg, *cg, dg = arrays
    dq, dk, dv, d_coefs, d_carry = _rows_backward(
        static, qg, kg, vg, cg, _rerun_groups(static, starts, arrays), dg, d_carry)
    return d_carry, [dq, dk, dv, *d_coefs]

  head = full * spacing                        # chunks in the whole groups before the last one
  d_carry, grads = groups([s[:, full:] for s in saved], list(d_final),
                          [x[:, head:] for x in chunked])
  pieces = [grads]
  stepped = full - full % per_launch           # whole groups the scan takes, per_launch a step
  if stepped < full:
    lo = stepped * spacing
    d_carry, grads = groups([s[:, stepped:full] for s in saved], d_carry,
                            [x[:, lo:head] for x in chunked])
    pieces.insert(0, grads)
  if stepped:
    steps, width = stepped // per_launch, per_launch * spacing
    # [R, stepped * spacing, ...] -> [steps, R, width, ...] for the scan, and back.
    split = lambda x, size, per: jnp.moveaxis(
        x[:, :size].reshape((x.shape[0], steps, per) + x.shape[2:]), 1, 0)
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape((x.shape[1], steps * width) + x.shape[3:])
    starts = [split(s, stepped, per_launch) for s in saved]

    def scan_body(d_carry, xs):
      state0, arrays = xs
      return groups(state0, d_carry, arrays)

    d_carry, grads = jax.lax.scan(
        scan_body, d_carry, (starts, [split(x, stepped * spacing, width) for x in chunked]),
        reverse=True)
    pieces.insert(0, [merge(x) for x in grads])
  grads = [jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
           for parts in zip(*pieces)]
  return grads, d_carry


def _rerun_groups(static: _Static, starts, arrays, as_part: bool = False):
  """The forward re-run from g checkpoint groups' saved start states in one launch, the groups'
  rows stacked ([R, g * L] -> [R * g, L], a reshape), saving every chunk-start state (and, for
  the Mosaic GPU mlp walk, what it reads beside them). starts: [R, g, ...] per state leaf;
  arrays: [q, k, v, *coefs, d_out], each [R, g * L, ...]. Returns the saved arrays, unstacked to
  [R, g * L, ...]; as_part (the Mosaic GPU mlp forward): (its `mgpu_launch.KernelPart`, the
  function of the part's results that returns them) for a launch beside the reverse walk."""
  g = starts[0].shape[1]
  stack = lambda x: x.reshape((x.shape[0] * g, x.shape[1] // g) + x.shape[2:])
  unstack = lambda xs: [x.reshape((x.shape[0] // g, x.shape[1] * g) + x.shape[2:]) for x in xs]
  qg, kg, vg, *cg, _ = arrays
  operands = (stack(qg), stack(kg), stack(vg), [stack(c) for c in cg],
              [s.reshape((-1,) + s.shape[2:]) for s in starts])
  if as_part:
    part, finish = _mosaic_rows_forward(static, *operands, save_every=1, outputs=False,
                                        as_part=True)
    return part, lambda results: unstack(finish(results)[2])
  return unstack(_rows_forward(static, *operands, save_every=1, outputs=False)[2])


def _rows_backward_pipelined(static: _Static, q, k, v, coefs, saved, d_out, d_final, spacing,
                             per_launch, fusible):
  """`_rows_backward_grouped` with the re-runs one step ahead of the walks: the same steps (the
  last group, then the whole groups left over from a multiple of per_launch, then per_launch
  groups at a time, their rows stacked), but each launch walks one step back while re-running
  the next step's groups beside it (`mgpu_launch`: on SMs of their own, where fusible; else the
  re-run runs after the walk). Only the first step's re-run runs alone. The walked step's
  states and the next step's are live together."""
  n = q.shape[1]
  full = -(-n // spacing) - 1
  head = full * spacing
  chunked = [q, k, v, *coefs, d_out]
  rerun = functools.partial(_rerun_groups, static)

  def walk(arrays, states, d_carry, next_step=None):
    """Walks a step back; re-runs next_step = (starts, arrays) beside it. Returns (d_carry,
    grads, next_step's states)."""
    qg, kg, vg, *cg, dg = arrays
    next_states = None
    if next_step is not None and fusible:
      part, saved_by = rerun(*next_step, as_part=True)
      dq, dk, dv, d_coefs, d_carry, (results,) = _mosaic_rows_backward(
          static, qg, kg, vg, cg, states, dg, d_carry, beside=[part])
      next_states = saved_by(results)
    else:
      dq, dk, dv, d_coefs, d_carry = _rows_backward(static, qg, kg, vg, cg, states, dg, d_carry)
      if next_step is not None:
        next_states = rerun(*next_step)
    return d_carry, [dq, dk, dv, *d_coefs], next_states

  stepped = full - full % per_launch           # whole groups the scan takes, per_launch a step
  steps, width = stepped // per_launch, per_launch * spacing
  split = lambda x, size, per: jnp.moveaxis(
      x[:, :size].reshape((x.shape[0], steps, per) + x.shape[2:]), 1, 0)
  scan_starts = [split(s, stepped, per_launch) for s in saved]
  scan_arrays = [split(x, stepped * spacing, width) for x in chunked]
  # The steps before the scan's, in the order they are walked; then the scan's last step.
  queue = [([s[:, full:] for s in saved], [x[:, head:] for x in chunked])]
  if stepped < full:
    queue.append(([s[:, stepped:full] for s in saved],
                  [x[:, stepped * spacing:head] for x in chunked]))
  if steps:
    queue.append(([s[-1] for s in scan_starts], [x[-1] for x in scan_arrays]))
  d_carry, states, pieces = list(d_final), rerun(*queue[0]), []
  for current, following in zip(queue, queue[1:]):
    d_carry, grads, states = walk(current[1], states, d_carry, following)
    pieces.insert(0, grads)
  if not steps:
    d_carry, grads, _ = walk(queue[-1][1], states, d_carry)
    pieces.insert(0, grads)
  else:
    walked = []
    if steps > 1:
      def scan_body(carry, xs):
        """Walks step i + 1 (its states carried) while re-running step i."""
        d_carry, states = carry
        starts_i, arrays_i, arrays_next = xs
        d_carry, grads, states = walk(arrays_next, states, d_carry, (starts_i, arrays_i))
        return (d_carry, states), grads

      (d_carry, states), walked = jax.lax.scan(
          scan_body, (d_carry, states),
          ([s[:-1] for s in scan_starts], [x[:-1] for x in scan_arrays],
           [x[1:] for x in scan_arrays]), reverse=True,
          unroll=PIPELINE_UNROLL if fusible else 1)
    d_carry, first, _ = walk([x[0] for x in scan_arrays], states, d_carry)
    grads = [jnp.concatenate([f[None], w], axis=0) if steps > 1 else f[None]
             for f, w in zip(first, walked or [None] * len(first))]
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape((x.shape[1], steps * width) + x.shape[3:])
    pieces.insert(0, [merge(x) for x in grads])
  grads = [jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
           for parts in zip(*pieces)]
  return grads, d_carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_rows(static: _Static, q, k, v, coefs, state):
  out, final, _ = _rows_forward(static, q, k, v, coefs, state, save_every=None)
  return out, final


def _kernel_rows_fwd(static, q, k, v, coefs, state):
  spacing = None
  if static.blocks.backward == "fused":
    spacing = static.blocks.checkpoint_spacing(q.shape[1])
  out, final, saved = _rows_forward(static, q, k, v, coefs, state, save_every=spacing)
  return (out, final), (q, k, v, coefs, state, saved)


def _kernel_rows_bwd(static, residuals, cotangents):
  q, k, v, coefs, state, saved = residuals
  d_out, d_final = cotangents
  if static.blocks.backward == "fused":
    spacing = static.blocks.checkpoint_spacing(q.shape[1])
    (dq, dk, dv, *d_coefs), d_state = _rows_backward_grouped(static, q, k, v, coefs, saved,
                                                             d_out, d_final, spacing)
    return dq, dk, dv, list(d_coefs), list(d_state)
  # "xla": recompute with the kernel's jnp reference (a scan of the same chunk step) and take
  # its vjp; exact, but one more forward and XLA's many small kernels.
  _, vjp = jax.vjp(functools.partial(_reference_rows, static), q, k, v, coefs, state)
  return vjp((d_out, d_final))


_kernel_rows.defvjp(_kernel_rows_fwd, _kernel_rows_bwd)


def _reference_rows(static: _Static, q, k, v, coefs, state):
  """`_chunk_step` scanned over chunks and vmapped over rows: the kernel's math in plain jnp."""
  step = _carry_step(static, q.dtype)
  split = _shared_rows(q, v)
  if split > 1:         # value_split's shared rows, copied for the vmap
    q, k = (jnp.repeat(x, split, axis=0) for x in (q, k))
    coefs = [jnp.repeat(c, split, axis=0) for c in coefs]

  def row(q, k, v, coefs, state):
    def body(carry, xs):
      new_carry, out = step(carry, *xs)
      return new_carry, out.astype(q.dtype)
    final, out = jax.lax.scan(body, list(state), (q, k, v, list(coefs)))
    return out, final

  return jax.vmap(row)(q, k, v, list(coefs), list(state))


def _run_rows(row_fn, q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates, state: MemoryState,
              config: MemoryConfig, padded_chunk: int | None = None, **static_kw):
  """Lay the op out as rows (each chunk padded to padded_chunk tokens; [R, N, C, d], or
  [R, N, d, C] for KernelBlocks.layout "features"), run `row_fn(static, q, k, v, coefs, state)`,
  and lay it back."""
  _, t, _, d = q_BxTxHxD.shape
  chunk = config.chunk_size
  padded_chunk = padded_chunk or chunk
  n = -(-t // chunk)
  cd = q_BxTxHxD.dtype
  acc = jnp.promote_types(cd, jnp.float32)
  names = list(config.model.layer_shapes(d))
  q, k, v = (_pad_chunks(_rows(x, n, chunk), padded_chunk)
             for x in (q_BxTxHxD, k_BxTxHxD, v_BxTxHxD))
  coefs = chunk_coefficients(gates, config, t, acc, padded_chunk)
  coef_fields = tuple(f for f in ChunkCoefs._fields if getattr(coefs, f) is not None)
  has_s = state.momentum is not None
  rows_state = _state_rows(state.weights, names, acc)
  if has_s:
    rows_state += _state_rows(state.momentum, names, acc)
  static = _Static(config, coef_fields, len(names), has_s, **static_kw)
  split = static.blocks.value_split or 1
  if split > 1:
    v, rows_state = _split_value_rows(split, v, rows_state)
  feature_major = static.layout == "features"
  if feature_major:
    q, k, v = (jnp.swapaxes(x, -1, -2) for x in (q, k, v))
    coefs = coefs_in_layout(coefs, static.layout)
  out_rows, final_rows = row_fn(static, q, k, v, [getattr(coefs, f) for f in coef_fields],
                                rows_state)
  if feature_major:
    out_rows = jnp.swapaxes(out_rows, -1, -2)
  if split > 1:
    out_rows, final_rows = _merge_value_rows(split, out_rows, final_rows)
  depth = len(names)
  return from_rows(out_rows, final_rows[:depth], final_rows[depth:] if has_s else None, names,
                   q_BxTxHxD.shape, chunk, cd)


def _split_value_rows(split, v, rows_state):
  """A linear memory's rows, each split into `split` rows by output feature (KernelBlocks.
  value_split): row r becomes rows r * split + s, holding W[s * d / split : (s + 1) * d / split]
  and the same slice of v; they share r's q, k and gate coefficients, which the kernel's
  programs r * split .. r * split + split - 1 all read (`_sequential_call`'s shared_rows), and
  whose gradients the backward sums over them. Exact, because f = W x with the l2 or dot loss
  couples no two output features: each slice of W sees only its slice of the loss gradient."""
  r, n, c, d = v.shape
  v = jnp.moveaxis(v.reshape(r, n, c, split, d // split), 3, 1).reshape(r * split, n, c, -1)
  state = [w.reshape((r * split, w.shape[1] // split, w.shape[2])) for w in rows_state]
  return v, state


def _merge_value_rows(split, out_RxNxCxDv, final_rows):
  """`_split_value_rows`' outputs [R * split, N, C, d / split] and states back to R rows."""
  rs, n, c, dv = out_RxNxCxDv.shape
  out = jnp.moveaxis(out_RxNxCxDv.reshape(rs // split, split, n, c, dv), 1, 3)
  final = [w.reshape((rs // split, split * w.shape[1], w.shape[2])) for w in final_rows]
  return out.reshape(rs // split, n, c, split * dv), final


def from_rows(out_RxNxCxD, weights_rows, momentum_rows, names, shape_BxTxHxD, chunk,
              dtype) -> tuple[Array, MemoryState]:
  """Row-layout results back to the op's contract: outputs [B, T, H, D] in dtype (each chunk's
  padded tokens and the padded tail dropped) and the state with leaves [B, H, out, in]."""
  b, t, h, d = shape_BxTxHxD
  n = out_RxNxCxD.shape[1]
  out = out_RxNxCxD[:, :, :chunk].reshape(b, h, n * chunk, d)[:, :, :t]
  unflat = lambda rows: {nm: {"w": r.reshape((b, h) + r.shape[1:])}
                         for nm, r in zip(names, rows)}
  return (jnp.moveaxis(out, 1, 2).astype(dtype),
          MemoryState(unflat(weights_rows),
                      None if momentum_rows is None else unflat(momentum_rows)))


# ----------------------------------------------------------------------------- public op


def kernel_memory(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, gates: Gates,
                  state: MemoryState, config: MemoryConfig, *, driver: str | None = None,
                  interpret=False, blocks: KernelBlocks = KernelBlocks()):
  """The fused kernel: (outputs [B, T, H, D], final state), the contract of ops/api.py.

  driver: None picks the platform's (PLATFORM_DRIVER); interpret: True (or TPU InterpretParams)
  runs the kernel body on any backend, for tests. Raises ValueError where the kernel cannot run
  this op (ops/api.py checks `unsupported_reason` first and falls back instead).
  """
  if driver is None:
    platform = target_platform()
    driver = PLATFORM_DRIVER.get(platform, "sequential_grid" if interpret else None)
    if driver is None:
      raise ValueError(f"platform={platform!r} has no compiled Pallas kernel; pass "
                       "interpret=True or use implementation='xla'")
  if driver not in DRIVERS:
    raise ValueError(f"driver={driver!r} is unknown; expected one of {DRIVERS}")
  from tnt_jax.ops.api import validate_memory_inputs   # api imports this module
  validate_memory_inputs(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates, state, {}, config)
  reason = unsupported_reason(config, q_BxTxHxD.shape[-1], q_BxTxHxD.dtype, driver=driver,
                              interpret=bool(interpret), blocks=blocks)
  if reason is not None:
    raise ValueError(f"the fused kernel does not support this op: {reason}")
  if uses_tiles(config, q_BxTxHxD.shape[-1], driver, blocks):
    from tnt_jax.kernels.chunk_start import tiled_chunk_start_memory   # it imports this module
    return tiled_chunk_start_memory(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates, state, config,
                                    driver=driver, interpret=interpret, blocks=blocks)
  blocks, mosaic_reason = rows_blocks(config, q_BxTxHxD.shape[-1], q_BxTxHxD.dtype,
                                      driver=driver, interpret=bool(interpret), blocks=blocks)
  if mosaic_reason is not None:
    _log_pallas_rows(mosaic_reason)
  blocks = dataclasses.replace(blocks, layout=blocks.resolved_layout(config.model.kind, driver),
                               value_split=value_split(
                                   config, q_BxTxHxD.shape[-1], driver, blocks,
                                   dtype=q_BxTxHxD.dtype, interpret=bool(interpret),
                                   rows=q_BxTxHxD.shape[0] * q_BxTxHxD.shape[2]))
  blocks = dataclasses.replace(blocks, save_every=_save_every(blocks, q_BxTxHxD, state, config))
  return _run_rows(_kernel_rows, q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates, state, config,
                   padded_chunk=row_chunk(config.chunk_size, driver, blocks), driver=driver,
                   interpret=interpret, blocks=blocks)


def _save_every(blocks: KernelBlocks, q_BxTxHxD, state: MemoryState, config: MemoryConfig):
  """KernelBlocks.checkpoint_spacing for this call, decided once as the forward is traced (its
  backward, traced later, reads it from the blocks)."""
  leaves = jax.tree.leaves((state.weights, state.momentum))
  elements = sum(x.size for x in leaves)
  num_chunks = -(-q_BxTxHxD.shape[1] // config.chunk_size)
  state_bytes, copy_bytes = elements * 4, elements * q_BxTxHxD.dtype.itemsize
  spacing = blocks.checkpoint_spacing(num_chunks, state_bytes, copy_bytes)
  if blocks.save_every is None:
    budget = blocks.max_saved_bytes or saved_states_budget()
    logging.log_first_n(
        logging.INFO, "fused backward of %d chunks x %d rows: checkpoint spacing %d (every "
        "chunk's states take %.2f GiB; budget %s; KernelBlocks.max_saved_bytes or save_every "
        "change it)", 8, num_chunks, q_BxTxHxD.shape[0] * q_BxTxHxD.shape[2], spacing,
        num_chunks * (state_bytes + copy_bytes) / 2**30,
        "unknown" if budget is None else f"{budget / 2**30:.2f} GiB")
  return spacing


def kernel_memory_reference(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array,
                            gates: Gates, state: MemoryState, config: MemoryConfig):
  """The kernel's math in plain jnp (`_chunk_step` scanned over chunks, vmapped over rows)."""
  return _run_rows(_reference_rows, q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, gates, state, config)
