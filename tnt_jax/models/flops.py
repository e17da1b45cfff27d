"""Analytic training FLOPs of an LM step (matmuls; backward = 2x forward), for MFU estimates."""

from tnt_jax.layers.attention import AttentionConfig
from tnt_jax.layers.flops import memory_layer_flops
from tnt_jax.layers.mac import MACConfig
from tnt_jax.models.config import LMConfig


def lm_train_flops(config: LMConfig, batch: int, seq_len: int) -> float:
  tokens = batch * seq_len
  fwd = 2.0 * tokens * config.d_model * config.vocab_size          # output head
  for layer in range(config.num_layers):
    fwd += 2.0 * tokens * 3 * config.d_model * config.mlp_hidden    # SwiGLU
    if isinstance(config.mixer_config(layer), MACConfig):   # its parts run on other inputs
      fwd += config.mixer_config(layer).flops(batch, seq_len)
      continue
    for mixer in config.mixer_parts(layer):
      if isinstance(mixer, AttentionConfig):
        inner = mixer.num_heads * mixer.head_dim
        span = seq_len / 2 if mixer.window is None else min(mixer.window, seq_len)
        span += mixer.persistent_tokens
        fwd += 2.0 * tokens * 5 * config.d_model * inner + 4.0 * tokens * span * inner
      else:
        fwd += memory_layer_flops(mixer, batch, seq_len, backward=False)
  return 3.0 * fwd
