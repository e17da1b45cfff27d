"""Generation with O(1) work per token: jitted prefill, decode steps and sampling for an LM.

    decoder = Decoder(model, max_length=4096)      # max_length: only full attention needs it
    logits, cache = decoder.prefill(prompt_BxT)     # parallel form, in aligned segments
    for token_B in decoder.generate(prompt_BxT, 200, temperature=0.8, top_p=0.95, seed=0):
      ...                                           # tokens as they are sampled

Every memory block carries its fast weights, momenta, chunk-start weights, Q-K matrices and
conv histories; attention blocks a KV cache (a ring of `window` keys for SWA). A multi-token
`extend` runs the parallel form and must start at a multiple of `alignment` (where every
memory's chunks and shards begin); decode steps may be taken anywhere. Rows of a batch share
one position (prompts of one length).

A TTT-E2E model (tnt_jax/models/ttt_e2e.py) also carries each row's mutable MLP weights, the
block caches at the current mini-batch's start and that mini-batch's tokens so far; its
alignment includes the mini-batch, and the decode step that completes a mini-batch also takes
its inner step (one forward and backward over that mini-batch, amortised O(1) per token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnt_jax.layers.attention import Attention
from tnt_jax.models.lm import LanguageModel
from tnt_jax.models.sampling import check_sampling, sample

Array = jax.Array
DEFAULT_SEGMENT = 2048


class Decoder:
  """Jitted streaming for a LanguageModel (parameters are read once, at construction)."""

  def __init__(self, model: LanguageModel, *, max_length: int | None = None,
               segment: int = DEFAULT_SEGMENT):
    self.graphdef, self.state = nnx.split(model)
    self.alignment = model.alignment()
    self.full_attention = any(isinstance(b.mixer, Attention) and b.mixer.config.window is None
                              for b in model.blocks)
    if self.full_attention and max_length is None:
      raise ValueError("this model has full-attention blocks, whose KV cache holds the whole "
                       "stream: pass max_length (prompt + generated tokens)")
    self.max_length = max_length
    # Prefill segments: a multiple of the alignment, so every segment may run in parallel.
    self.segment = max(1, segment // self.alignment) * self.alignment
    # The cache is donated: updated in place (a KV cache is not copied every token), so a cache
    # passed to extend or a step is consumed; use the one returned.
    self._extend = jax.jit(self._extend_fn, donate_argnums=2)
    self._sample_step = jax.jit(self._sample_step_fn, static_argnums=(4, 5, 6),
                                donate_argnums=2)

  def _model(self, state):
    return nnx.merge(self.graphdef, state)

  def _extend_fn(self, state, tokens_BxT, cache):
    return self._model(state).extend(tokens_BxT, cache)

  def _sample_step_fn(self, state, token_B, cache, key, temperature, top_k, top_p):
    logits, cache = self._model(state).extend(token_B[:, None], cache)
    return sample(logits[:, -1], key, temperature, top_k, top_p), logits[:, -1], cache

  def init_cache(self, batch: int) -> dict:
    return self._model(self.state).init_cache(batch, self.max_length)

  def _check_extend(self, length: int, cache: dict) -> None:
    position = int(cache["position"])
    if length > 1 and position % self.alignment:
      raise ValueError(f"a {length}-token extend at position {position}: multi-token calls "
                       f"must start at a multiple of the model's alignment {self.alignment} "
                       "(where its chunks and shards begin); decode single tokens until then")
    if self.max_length is not None and position + length > self.max_length:
      raise ValueError(f"position {position} + {length} tokens exceeds max_length="
                       f"{self.max_length} of this decoder's cache")

  def extend(self, tokens_BxT, cache: dict) -> tuple[Array, dict]:
    """Logits [B, T, V] for T more tokens and the cache after them (`cache` is consumed)."""
    tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
    self._check_extend(tokens_BxT.shape[1], cache)
    return self._extend(self.state, tokens_BxT, cache)

  def _segments(self, tokens_BxT, cache: dict | None):
    """Extend by tokens in segments of `segment` (bounded memory at any length): yields each
    segment's logits [B, S, V] and the cache after it."""
    tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
    if tokens_BxT.ndim != 2 or tokens_BxT.shape[1] < 1:
      raise ValueError(f"tokens must be [batch, length >= 1], got shape {tokens_BxT.shape}")
    cache = self.init_cache(tokens_BxT.shape[0]) if cache is None else cache
    for lo in range(0, tokens_BxT.shape[1], self.segment):
      logits, cache = self.extend(tokens_BxT[:, lo:lo + self.segment], cache)
      yield logits, cache

  def prefill(self, tokens_BxT, cache: dict | None = None) -> tuple[Array, dict]:
    """Extend by a prompt; returns the last token's logits [B, V] and the cache."""
    for logits, cache in self._segments(tokens_BxT, cache):
      pass
    return logits[:, -1], cache

  def forward(self, tokens_BxT) -> Array:
    """Logits [B, T, V] of a whole sequence, computed segment by segment with the carried cache:
    equal to the parallel forward, in memory bounded by the segment (long-context evaluation)."""
    return jnp.concatenate([logits for logits, _ in self._segments(tokens_BxT, None)], axis=1)

  def generate(self, prompt_BxT, num_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0):
    """Yield [B] int32 numpy arrays of sampled tokens, one per step, as they are made."""
    check_sampling(temperature, top_k, top_p)
    if num_tokens < 0:
      raise ValueError(f"num_tokens={num_tokens} must be >= 0")
    prompt = np.asarray(prompt_BxT)
    if self.max_length is not None and prompt.shape[1] + num_tokens > self.max_length:
      raise ValueError(f"prompt length {prompt.shape[1]} + num_tokens {num_tokens} exceeds "
                       f"max_length={self.max_length}")
    logits, cache = self.prefill(prompt)
    key = jax.random.key(seed)
    token = sample(logits, jax.random.fold_in(key, 0), temperature, top_k, top_p)
    for i in range(num_tokens):
      yield np.asarray(token)
      if i + 1 < num_tokens:
        token, _, cache = self._sample_step(self.state, token, cache,
                                            jax.random.fold_in(key, i + 1), float(temperature),
                                            int(top_k), float(top_p))
