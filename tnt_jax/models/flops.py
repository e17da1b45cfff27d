"""Analytic training FLOPs of an LM step (matmuls; backward = 2x forward), for MFU estimates."""

from tnt_jax.layers.attention import AttentionConfig
from tnt_jax.layers.flops import memory_layer_flops
from tnt_jax.layers.mac import MACConfig
from tnt_jax.models.config import LMConfig


def block_forward_flops(config: LMConfig, layer: int, batch: int, seq_len: int) -> float:
  """One block's forward: its mixer and its MLP(s)."""
  tokens = batch * seq_len
  mlp = 2.0 * tokens * 3 * config.d_model * config.mlp_hidden       # SwiGLU
  if config.ttt_e2e is not None and config.ttt_e2e.is_mutable(layer, config.num_layers):
    mlp *= 2                                                          # + the mutable twin
  if isinstance(config.mixer_config(layer), MACConfig):   # its parts run on other inputs
    return mlp + config.mixer_config(layer).flops(batch, seq_len)
  fwd = mlp
  for mixer in config.mixer_parts(layer):
    if isinstance(mixer, AttentionConfig):
      inner = mixer.num_heads * mixer.head_dim
      span = seq_len / 2 if mixer.window is None else min(mixer.window, seq_len)
      span += mixer.persistent_tokens
      fwd += 2.0 * tokens * 5 * config.d_model * inner + 4.0 * tokens * span * inner
    else:
      fwd += memory_layer_flops(mixer, batch, seq_len, backward=False)
  return fwd


def lm_train_flops(config: LMConfig, batch: int, seq_len: int) -> float:
  """Forward + backward (3x forward). TTT-E2E also takes the inner gradient, a backward from
  the loss down to the first mutable block (2x that part's forward), and the outer backward
  runs through it too: 3 x (forward + 2 x top part). Rematerialisation is not counted."""
  head = 2.0 * batch * seq_len * config.d_model * config.vocab_size
  blocks = [block_forward_flops(config, layer, batch, seq_len)
            for layer in range(config.num_layers)]
  fwd = head + sum(blocks)
  if config.ttt_e2e is None:
    return 3.0 * fwd
  top = head + sum(blocks[config.num_layers - config.ttt_e2e.num_mutable(config.num_layers):])
  return 3.0 * (fwd + 2.0 * top)
