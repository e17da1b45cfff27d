"""Analytic FLOPs of a memory layer (matmuls only; backward = 2x forward), for MFU reports."""

from tnt_jax.layers.configs import MemoryLayerConfig
from tnt_jax.ops import flops as op_flops


def memory_layer_flops(config: MemoryLayerConfig, batch: int, length: int,
                       backward: bool) -> float:
  tokens = batch * length
  d, inner, heads, hd = config.d_model, config.inner_dim, config.num_heads, config.head_dim
  tnt = config.memory_config()
  memories = [tnt.global_memory] + [local.memory for local in tnt.local_memories]
  gate_outputs = sum(heads * len(m.rule.required_gates()) for m in memories)
  fwd = 2.0 * tokens * (5 * d * inner + d * gate_outputs)    # q,k,v,gate,out + gate projections
  fwd += sum(op_flops.memory_op_flops(m, batch, length, heads, hd, backward=False)
             for m in memories)
  if tnt.local_memories and tnt.qk_projection:
    fwd += 2.0 * 2 * tokens * heads * hd * hd     # q P_prev and the block's k k^T, per token
  if config.shared_window is not None:    # scores and values over min(window, length) keys
    fwd += 4.0 * tokens * min(config.shared_window, length) * inner
  return 3.0 * fwd if backward else fwd
