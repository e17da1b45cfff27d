"""The decoder LM: embedding, pre-norm blocks [token mixer + SwiGLU MLP], final norm, head.

With `config.ttt_e2e` it is a TTT-E2E model (tnt_jax/models/ttt_e2e.py): the last blocks add a
mutable SwiGLU beside the MLP, and the forward is a scan over mini-batches that steps it."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tnt_jax.kernels.chunk_memory import saved_states_shared_by
from tnt_jax.layers.attention import Attention, AttentionConfig
from tnt_jax.layers.hybrid import HybridConfig, hybrid_mixer
from tnt_jax.layers.mac import MACConfig
from tnt_jax.layers.memory_layer import MemoryLayer, count_params
from tnt_jax.layers.mlp import SwiGLU
from tnt_jax.layers.norms import RMSNorm
from tnt_jax.models import ttt_e2e
from tnt_jax.models.config import LMConfig

Array = jax.Array


class Block(nnx.Module):

  def __init__(self, config: LMConfig, layer: int, *, rngs: nnx.Rngs, dtype):
    mixer_config = config.mixer_config(layer)
    self.mixer_norm = RMSNorm(config.d_model)
    if isinstance(mixer_config, AttentionConfig):
      self.mixer = Attention(mixer_config, rngs=rngs, dtype=dtype)
    elif isinstance(mixer_config, (HybridConfig, MACConfig)):
      self.mixer = hybrid_mixer(mixer_config, rngs=rngs, dtype=dtype)
    else:
      self.mixer = MemoryLayer(mixer_config, rngs=rngs, dtype=dtype)
    self.mlp_norm = RMSNorm(config.d_model)
    self.mlp = SwiGLU(config.d_model, config.mlp_hidden, rngs=rngs, dtype=dtype)
    if config.ttt_e2e is not None and config.ttt_e2e.is_mutable(layer, config.num_layers):
      # TTT-E2E: the mutable MLP, stepped at test time; self.mlp is its frozen twin. Its output
      # projection starts at zero, so at init the block is exactly the plain block (the extra
      # branch neither doubles the MLP's output scale nor adds noise before anything is
      # learned); the first inner step (gradient x -> h^T dL/dy) moves it off zero, and then
      # gate and up get gradients too. The outer loop trains all three from the first step.
      self.mutable_mlp = SwiGLU(config.d_model, config.mlp_hidden, rngs=rngs, dtype=dtype)
      down = self.mutable_mlp.down.kernel
      down.set_value(jnp.zeros_like(down[...]))

  def _mlps(self, x, mutable):
    """x + mlp(norm x) [+ mutable_mlp(norm x), with per-row weights `mutable` when given]."""
    h = self.mlp_norm(x)
    out = x + self.mlp(h).astype(x.dtype)
    if mutable is not None:
      return out + ttt_e2e.swiglu(mutable, h, self.mutable_mlp.down.dtype).astype(x.dtype)
    if hasattr(self, "mutable_mlp"):
      return out + self.mutable_mlp(h).astype(x.dtype)
    return out

  def __call__(self, x_BxTxD: Array, context_axis: str | None = None) -> Array:
    y = self.mixer(self.mixer_norm(x_BxTxD), context_axis=context_axis)
    x = x_BxTxD + y.astype(x_BxTxD.dtype)
    return self._mlps(x, None)

  def extend(self, x_BxTxD: Array, cache: dict, mutable: dict[str, Array] | None = None
             ) -> tuple[Array, dict]:
    """mutable: TTT-E2E per-row weights of this block's mutable MLP (models/ttt_e2e.py)."""
    y, cache = self.mixer.extend(self.mixer_norm(x_BxTxD), cache)
    x = x_BxTxD + y.astype(x_BxTxD.dtype)
    return self._mlps(x, mutable), cache


class TokenEmbedding(nnx.Embed):
  """nnx.Embed whose lookup may be a one-hot matmul (LMConfig.embedding_lookup): the same
  vectors (one product term each), but the table's gradient is a matmul instead of a scatter-add
  whose atomics crowd a small vocabulary's rows."""

  def __init__(self, *args, one_hot: bool, **kwargs):
    super().__init__(*args, **kwargs)
    self.one_hot = one_hot

  def __call__(self, tokens: Array) -> Array:
    if not self.one_hot:
      return super().__call__(tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integers, got {tokens.dtype}")
    table = self.embedding[...].astype(self.dtype)
    return jax.nn.one_hot(tokens, self.num_embeddings, dtype=self.dtype) @ table


class LanguageModel(nnx.Module):
  """tokens [B, T] int -> logits [B, T, V] float32 (float64 for a float64 model)."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.dtype = jnp.dtype(config.dtype)
    self.embed = TokenEmbedding(config.vocab_size, config.d_model, dtype=self.dtype,
                                embedding_init=nnx.initializers.normal(1.0), rngs=rngs,
                                one_hot=config.one_hot_embedding)
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
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))

  def __call__(self, tokens_BxT: Array, context_axis: str | None = None) -> Array:
    """context_axis: inside shard_map with the sequence split over that mesh axis (context
    parallelism): tokens are this device's slice, and so are the logits."""
    self._check_tokens(tokens_BxT)
    x = self.embed(tokens_BxT)
    if self.config.ttt_e2e is not None:
      if context_axis is not None:
        raise ValueError("a ttt_e2e model takes its inner steps mini-batch after mini-batch "
                         "along the sequence: it cannot run context-parallel (context_axis)")
      return self.ttt_forward(x, tokens_BxT)
    blocks = list(self.blocks)
    period = len(self.config.pattern)
    groups = len(blocks) // period if self.config.scan_layers else 0
    # Without block remat every block's memory-kernel residuals are alive in the backward pass
    # at once: the kernels' default saved-state budget is split between them.
    with saved_states_shared_by(1 if self.config.remat else len(blocks)):
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
    (prompt + generated); needed only by full-attention blocks, whose cache grows with it.

    TTT-E2E adds "ttt": the current mini-batch's mutable weights (per row), every block's
    cache at its start and its tokens so far ([B, mini_batch], the first position % mini_batch
    of them valid), from which its inner step is taken when it completes."""
    cache = {"blocks": self._block_caches(batch, max_length),
             "position": jnp.zeros((), jnp.int32)}
    if self.config.ttt_e2e is not None:   # separate arrays: the decoder donates the cache
      cache["ttt"] = {"weights": self._mutable_weights(batch),
                      "start": self._block_caches(batch, max_length),
                      "tokens": jnp.zeros((batch, self.config.ttt_e2e.mini_batch), jnp.int32)}
    return cache

  def _block_caches(self, batch, max_length):
    return [block.mixer.init_cache(batch) if isinstance(block.mixer, MemoryLayer)
            else block.mixer.init_cache(batch, max_length) for block in self.blocks]

  def alignment(self) -> int:
    """A multi-token `extend` must start at a multiple of this (every memory's chunks and
    shards begin there, and TTT-E2E's mini-batches); single tokens may be decoded anywhere."""
    alignment = math.lcm(*(block.mixer.alignment() for block in self.blocks))
    if self.config.ttt_e2e is not None:
      alignment = math.lcm(alignment, self.config.ttt_e2e.mini_batch)
    return alignment

  def extend(self, tokens_BxT: Array, cache: dict) -> tuple[Array, dict]:
    """Logits of T more tokens of the stream, and the cache after them. Equal to the parallel
    __call__ on the whole stream so far (tests/models/test_decoding.py)."""
    self._check_tokens(tokens_BxT)
    if self.config.ttt_e2e is not None:
      return self._ttt_extend(tokens_BxT, cache)
    x = self.embed(tokens_BxT)
    caches = []
    for block, block_cache in zip(self.blocks, cache["blocks"]):
      x, block_cache = block.extend(x, block_cache)
      caches.append(block_cache)
    return self._logits(x), {"blocks": caches,
                             "position": cache["position"] + tokens_BxT.shape[1]}

  # --- TTT-E2E (models/ttt_e2e.py): the blocks run over mini-batches from their KV caches ---

  def ttt_forward(self, x_BxTxD: Array, tokens_BxT: Array) -> Array:
    """Logits [B, T, V] of a TTT-E2E model for embedded inputs x from the stream's start
    (tokens: the inner loss's targets); mini-batch i's logits are made with the weights after
    its i inner steps. __call__ runs this after the embedding."""
    b, t = tokens_BxT.shape
    logits, *_ = ttt_e2e.stream(self._ttt_runner(), self._mutable_weights(b),
                                self._block_caches(b, t), x_BxTxD, tokens_BxT,
                                self.config.ttt_e2e, step_last=False)
    return logits

  def _mutable_weights(self, batch: int) -> ttt_e2e.MutableWeights:
    """W_0: every mutable MLP's kernels (blocks in order), one copy per row [B, ...], in the
    wider of the parameter and compute dtypes (float32 steps under bfloat16 compute)."""
    kernel = lambda block, part: getattr(block.mutable_mlp, part).kernel[...]
    return [{part: jnp.broadcast_to(k.astype(jnp.promote_types(k.dtype, self.dtype)),
                                    (batch,) + k.shape)
             for part in ttt_e2e.SWIGLU_PARTS for k in [kernel(block, part)]}
            for block in self.blocks if hasattr(block, "mutable_mlp")]

  def _ttt_run(self, weights, caches, x_BxTxD):
    """(logits, caches after): the blocks over T more tokens from their caches, the mutable
    MLPs with the per-row `weights`."""
    weights, out = iter(weights), []
    for block, cache in zip(self.blocks, caches):
      x_BxTxD, cache = block.extend(x_BxTxD, cache,
                                    next(weights) if hasattr(block, "mutable_mlp") else None)
      out.append(cache)
    return self._logits(x_BxTxD), out

  def _ttt_runner(self):
    """_ttt_run as a pure function of its arguments (the module merged inside, as in the
    layer scan), to be traced inside the scan, remat and inner gradient."""
    graphdef, state = nnx.split(self)
    return lambda weights, caches, x: nnx.merge(graphdef, state)._ttt_run(weights, caches, x)

  def _ttt_extend(self, tokens_BxT, cache):
    """T > 1 tokens from a mini-batch boundary (a multiple of alignment(): Decoder checks):
    the parallel scan. One token: run with the current weights and appended to the
    mini-batch; if that completes it, its inner step (its forward recomputed from the caches
    at its start with the same weights, as the parallel scan computes it), and the caches
    after it start the next mini-batch."""
    config = self.config.ttt_e2e
    m = config.mini_batch
    t = tokens_BxT.shape[1]
    tokens_BxT = tokens_BxT.astype(jnp.int32)
    state = cache["ttt"]
    run = self._ttt_runner()
    x = self.embed(tokens_BxT)
    if t == 1:
      logits, blocks = run(state["weights"], cache["blocks"], x)
      offset = cache["position"] % m
      tokens_BxM = jax.lax.dynamic_update_slice(state["tokens"], tokens_BxT,
                                                (jnp.zeros_like(offset), offset))
      graphdef, params = nnx.split(self.embed)

      def complete():
        x_BxMxD = nnx.merge(graphdef, params)(tokens_BxM)
        _, after, weights = ttt_e2e.inner_step(run, state["weights"], state["start"], x_BxMxD,
                                               tokens_BxM, config)
        return weights, after, after

      weights, start, blocks = jax.lax.cond(offset == m - 1, complete,
                                            lambda: (state["weights"], state["start"], blocks))
    else:
      logits, weights, start, blocks = ttt_e2e.stream(run, state["weights"], cache["blocks"], x,
                                                      tokens_BxT, config, step_last=True)
      rest = t % m
      tokens_BxM = jnp.zeros_like(state["tokens"]).at[:, :rest].set(tokens_BxT[:, t - rest:])
    return logits, {"blocks": blocks, "position": cache["position"] + t,
                    "ttt": {"weights": weights, "start": start, "tokens": tokens_BxM}}


def param_summary(model: LanguageModel) -> str:
  c = model.config
  total = count_params(model)
  embed = c.vocab_size * c.d_model
  kinds = ",".join(c.pattern)
  summary = (f"{total:,} parameters ({total - embed:,} without the embedding); {c.num_layers} "
             f"blocks of [{kinds}], d_model {c.d_model}, {c.num_heads} heads")
  if c.ttt_e2e is not None:
    e = c.ttt_e2e
    summary += (f"; TTT-E2E: mutable MLPs in the last {e.num_mutable(c.num_layers)} blocks, "
                f"a clipped SGD step (lr {e.inner_lr}, clip {e.clip_norm}) per {e.mini_batch} "
                "tokens")
  return summary
