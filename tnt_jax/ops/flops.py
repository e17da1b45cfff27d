"""Analytic FLOP counts of the memory op, for throughput and MFU reports.

Counted per (batch, head, token) as the matmuls the chunkwise op executes (2 FLOPs per
multiply-add; elementwise work and the gate coefficients are not counted). The backward pass is
counted as twice the forward, the usual model-FLOPs convention.
"""

from tnt_jax.memory.config import MemoryConfig


def memory_op_flops_per_token(config: MemoryConfig, head_dim: int) -> float:
  """Forward FLOPs per token per head of `chunkwise_memory`."""
  shapes = config.model.layer_shapes(head_dim).values()
  weight_macs = sum(out_dim * in_dim for out_dim, in_dim in shapes)
  in_out = sum(out_dim + in_dim for out_dim, in_dim in shapes)
  carried = 2 if config.rule.kind == "titans" else 1           # W, and S for titans
  grads = 2 * 2 * weight_macs                                  # keys forward + deltas backward
  if config.read == "cumulative":
    # W0 x and S0 x, plus the C x C scores (x . a) and their product with the deltas.
    read = 2 * carried * weight_macs + 2 * config.chunk_size * in_out
  else:
    read = 2 * weight_macs
  update = 2 * carried * weight_macs                           # sum_j c_j delta_j a_j^T
  return float(grads + read + update)


def memory_op_flops(config: MemoryConfig, batch: int, length: int, heads: int, head_dim: int,
                    backward: bool) -> float:
  fwd = memory_op_flops_per_token(config, head_dim) * batch * length * heads
  return 3.0 * fwd if backward else fwd


def causal_attention_flops(batch: int, length: int, heads: int, head_dim: int,
                           backward: bool) -> float:
  """QK^T and PV over the causal half (what FlashAttention-style kernels execute)."""
  fwd = 2 * 2 * batch * heads * head_dim * length * length / 2
  return 3.5 * fwd if backward else fwd   # FlashAttention backward recomputes QK^T: 2.5x forward
