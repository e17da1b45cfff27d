"""The decoder LM: embedding, pre-norm blocks [token mixer + SwiGLU MLP], final norm, head."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tnt_jax.layers.attention import Attention, AttentionConfig
from tnt_jax.layers.hybrid import HybridConfig, HybridMixer
from tnt_jax.layers.memory_layer import MemoryLayer, count_params
from tnt_jax.layers.mlp import SwiGLU
from tnt_jax.layers.norms import RMSNorm
from tnt_jax.models.config import LMConfig

Array = jax.Array


class Block(nnx.Module):

  def __init__(self, config: LMConfig, layer: int, *, rngs: nnx.Rngs, dtype):
    mixer_config = config.mixer_config(layer)
    self.mixer_norm = RMSNorm(config.d_model)
    if isinstance(mixer_config, AttentionConfig):
      self.mixer = Attention(mixer_config, rngs=rngs, dtype=dtype)
    elif isinstance(mixer_config, HybridConfig):
      self.mixer = HybridMixer(mixer_config, rngs=rngs, dtype=dtype)
    else:
      self.mixer = MemoryLayer(mixer_config, rngs=rngs, dtype=dtype)
    self.mlp_norm = RMSNorm(config.d_model)
    self.mlp = SwiGLU(config.d_model, config.mlp_hidden, rngs=rngs, dtype=dtype)

  def __call__(self, x_BxTxD: Array, context_axis: str | None = None) -> Array:
    y = self.mixer(self.mixer_norm(x_BxTxD), context_axis=context_axis)
    x = x_BxTxD + y.astype(x_BxTxD.dtype)
    return x + self.mlp(self.mlp_norm(x)).astype(x.dtype)

  def extend(self, x_BxTxD: Array, cache: dict) -> tuple[Array, dict]:
    y, cache = self.mixer.extend(self.mixer_norm(x_BxTxD), cache)
    x = x_BxTxD + y.astype(x_BxTxD.dtype)
    return x + self.mlp(self.mlp_norm(x)).astype(x.dtype), cache


class LanguageModel(nnx.Module):
  """tokens [B, T] int -> logits [B, T, V] float32."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.dtype = jnp.dtype(config.dtype)
    self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=self.dtype,
                           embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.blocks = nnx.List([Block(config, i, rngs=rngs, dtype=self.dtype)
                            for i in range(config.num_layers)])
    self.final_norm = RMSNorm(config.d_model)
    if not config.tie_embeddings:
      self.head = nnx.Linear(config.d_model, config.vocab_size, use_bias=False,
                             dtype=self.dtype, rngs=rngs)

  def _check_tokens(self, tokens_BxT):
    if tokens_BxT.ndim != 2:
      raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens_BxT.shape)}")

  def _logits(self, x):
    x = self.final_norm(x)
    if self.config.tie_embeddings:
      logits = self.embed.attend(x) / math.sqrt(self.config.d_model)
    else:
      logits = self.head(x)
    return logits.astype(jnp.float32)

  def __call__(self, tokens_BxT: Array, context_axis: str | None = None) -> Array:
    """context_axis: inside shard_map with the sequence split over that mesh axis (context
    parallelism): tokens are this device's slice, and so are the logits."""
    self._check_tokens(tokens_BxT)
    x = self.embed(tokens_BxT)
    blocks = list(self.blocks)
    period = len(self.config.pattern)
    groups = len(blocks) // period if self.config.scan_layers else 0
    if groups > 1:
      x = self._scan_groups(blocks[:groups * period], period, x, context_axis)
      blocks = blocks[groups * period:]
    for block in blocks:
      x = self._run_block(nnx.split(block), x, context_axis)
    return self._logits(x)

  def _run_block(self, split_block, x, context_axis):
    def run(state, x):
      return nnx.merge(split_block[0], state)(x, context_axis)
    if self.config.remat:
      run = jax.checkpoint(run)
    return run(split_block[1], x)

  def _scan_groups(self, blocks, period, x, context_axis):
    """Blocks p, p + period, p + 2 period, ... share a structure: stack their states and scan
    over the groups (one pattern period each), running each block as in the unrolled loop."""
    splits = [nnx.split(block) for block in blocks]
    graphdefs = [graphdef for graphdef, _ in splits[:period]]
    stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *(s for _, s in splits[p::period]))
               for p in range(period)]

    def group(x, states):
      for graphdef, state in zip(graphdefs, states):
        x = self._run_block((graphdef, state), x, context_axis)
      return x, None

    x, _ = jax.lax.scan(group, x, stacked)
    return x

  # --- streaming and decoding (models/decoding.py wraps these with checks and jit) ---

  def init_cache(self, batch: int, max_length: int | None = None) -> dict:
    """Every block's recurrent state before the first token. max_length: the longest stream
    (prompt + generated); needed only by full-attention blocks, whose cache grows with it."""
    return {"blocks": [block.mixer.init_cache(batch)
                       if isinstance(block.mixer, MemoryLayer)
                       else block.mixer.init_cache(batch, max_length)
                       for block in self.blocks],
            "position": jnp.zeros((), jnp.int32)}

  def alignment(self) -> int:
    """A multi-token `extend` must start at a multiple of this (every memory's chunks and
    shards begin there); single tokens may be decoded anywhere."""
    return math.lcm(*(block.mixer.alignment() for block in self.blocks))

  def extend(self, tokens_BxT: Array, cache: dict) -> tuple[Array, dict]:
    """Logits of T more tokens of the stream, and the cache after them. Equal to the parallel
    __call__ on the whole stream so far (tests/models/test_decoding.py)."""
    self._check_tokens(tokens_BxT)
    x = self.embed(tokens_BxT)
    caches = []
    for block, block_cache in zip(self.blocks, cache["blocks"]):
      x, block_cache = block.extend(x, block_cache)
      caches.append(block_cache)
    return self._logits(x), {"blocks": caches,
                             "position": cache["position"] + tokens_BxT.shape[1]}


def param_summary(model: LanguageModel) -> str:
  c = model.config
  total = count_params(model)
  embed = c.vocab_size * c.d_model
  kinds = ",".join(c.pattern)
  return (f"{total:,} parameters ({total - embed:,} without the embedding); {c.num_layers} "
          f"blocks of [{kinds}], d_model {c.d_model}, {c.num_heads} heads")
