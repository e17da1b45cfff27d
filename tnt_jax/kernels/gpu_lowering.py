"""The fused kernel's GPU lowering, from any host: the Triton IR of every kernel an op emits.

Lowering for CUDA (`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`) needs no GPU; it
runs Pallas' Triton lowering of each kernel. `lower_kernels` records what that lowering returns,
for tests (an operation the lowering rejects fails on the CPU) and for experiments/kernel_ptx.py
(which compiles the IR to PTX to read registers, spills and matrix instructions).
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tnt_jax.kernels.chunk_memory import KernelBlocks, kernel_memory
from tnt_jax.memory.config import MemoryConfig


class TritonKernelIR(NamedTuple):
  ttir: str            # the kernel's Triton IR, as text
  num_warps: int
  num_stages: int

  @property
  def name(self) -> str:
    found = re.search(r"tt\.func (?:public )?@(\w+)", self.ttir)
    return found.group(1) if found else "?"


@contextlib.contextmanager
def capture_triton_ir():
  """Within the block, every kernel Pallas' Triton lowering emits is appended to the yielded
  list as a TritonKernelIR."""
  from jax._src.pallas.triton import lowering
  records, lower = [], lowering.lower_jaxpr_to_triton_module

  def recording_lower(*args, **kwargs):
    result = lower(*args, **kwargs)
    params = sys._getframe(1).f_locals.get("triton_params")   # the caller's CompilerParams
    records.append(TritonKernelIR(result.module.operation.get_asm(),
                                  getattr(params, "num_warps", None) or 4,
                                  getattr(params, "num_stages", None) or 1))
    return result

  lowering.lower_jaxpr_to_triton_module = recording_lower
  try:
    yield records
  finally:
    lowering.lower_jaxpr_to_triton_module = lower


def kernel_op(config: MemoryConfig, blocks: KernelBlocks, backward: bool):
  """The compiled GPU kernel as a function of (q, k, v, gates, state), or its gradient's
  (no platform check, so a CPU host can lower it for CUDA)."""
  def forward(q, k, v, gates, state):
    return kernel_memory(q, k, v, gates, state, config, driver="chunk_loop", interpret=False,
                         blocks=blocks)

  if not backward:
    return forward

  def loss(*args):
    out, final = forward(*args)
    return jnp.mean(out.astype(jnp.float32) ** 2) + sum(jnp.mean(x)
                                                         for x in jax.tree.leaves(final))
  return jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def lower_kernels(config: MemoryConfig, blocks: KernelBlocks, backward: bool,
                  args) -> list[TritonKernelIR]:
  """Lower the kernel op (forward, or forward and backward) on args = (q, k, v, gates, state)
  for CUDA, returning the Triton IR of every kernel it launches, in lowering order."""
  with capture_triton_ir() as records:
    jax.jit(kernel_op(config, blocks, backward)).trace(*args).lower(
        lowering_platforms=("cuda",))
  return list(records)
