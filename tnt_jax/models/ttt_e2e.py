"""TTT-E2E (SPEC §3): test-time training of mutable MLPs, mini-batch by mini-batch, end to end.

A Transformer with (sliding-window) attention in every block; the last `mutable_fraction` of
the blocks carry a second SwiGLU, the *mutable* MLP, beside the usual one (its frozen twin):
block output = x + mlp(norm(x)) + mutable_mlp(norm(x)). The stream is cut into mini-batches of
`mini_batch` tokens. Mini-batch i runs with mutable weights W_i (W_0: the model's parameters);
when it is complete, W_{i+1} = W_i - inner_lr * clip(g_i), g_i the gradient of its inner loss
w.r.t. W_i, clipped by its global norm over all mutable weights of the model. Everything else
(embedding, attention, frozen twins, norms, head) is only trained by the outer loop, whose loss
on all logits is differentiated through the inner steps (gradients of gradients), so W_0 is
learned to be a good starting point for test-time steps.

Inner loss: the mean next-token cross-entropy over the mini-batch's positions whose target lies
inside the same mini-batch (mini_batch - 1 pairs per row). The last token's target is the first
token of the next mini-batch, which is left out so that the step can be taken as soon as the
mini-batch is complete: decoding then takes exactly the steps of the parallel forward, and the
logits of mini-batch i depend on tokens <= t only (W_i is made from earlier mini-batches).

Each row (sequence) of a batch adapts its own copy of the weights, as each document at test
time would: the weights are [B, ...] (W_0 broadcast) and a row's gradient is that row's own;
the inner loss sums the rows' mean losses, so one `jax.grad` gives every row its gradient, and
clipping is per row. Rows never see each other (tests/models/test_ttt_e2e.py checks it).

The functions here are model-agnostic: `run(weights, caches, x_BxMxD) -> (logits, caches)` runs
the model's blocks over M more tokens from their KV caches (LanguageModel, tnt_jax/models/lm.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array
# Per mutable block (in block order): {"gate": [B, D, H], "up": [B, D, H], "down": [B, H, D]}.
MutableWeights = list[dict[str, Array]]
Run = Callable[[MutableWeights, Any, Array], tuple[Array, Any]]
SWIGLU_PARTS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TTTE2EConfig:
  """mini_batch: tokens per inner step (>= 2: the inner loss needs a pair). inner_lr: the inner
  SGD step size. clip_norm: the inner gradient's global norm over all mutable weights is clipped
  to this (per row). mutable_fraction: the last ceil(num_layers * fraction) blocks get a
  mutable MLP. remat: checkpoint each mini-batch step of the scan (the outer backward recomputes
  a step's forward and inner gradient instead of storing them for every mini-batch)."""

  mini_batch: int = 1024
  inner_lr: float = 1.0
  clip_norm: float = 1.0
  mutable_fraction: float = 0.25
  remat: bool = True

  def __post_init__(self):
    if not _is_int(self.mini_batch) or self.mini_batch < 2:
      raise ValueError(f"ttt_e2e mini_batch={self.mini_batch!r} must be an integer >= 2 (the "
                       "inner loss needs at least one next-token pair inside a mini-batch)")
    if not _is_number(self.inner_lr) or not math.isfinite(self.inner_lr) or self.inner_lr < 0:
      raise ValueError(f"ttt_e2e inner_lr={self.inner_lr!r} must be a finite number >= 0")
    if not _is_number(self.clip_norm) or not self.clip_norm > 0:
      raise ValueError(f"ttt_e2e clip_norm={self.clip_norm!r} must be a number > 0 (inf: no "
                       "clipping)")
    if not _is_number(self.mutable_fraction) or not 0 < self.mutable_fraction <= 1:
      raise ValueError(f"ttt_e2e mutable_fraction={self.mutable_fraction!r} must be in (0, 1]")
    if not isinstance(self.remat, bool):
      raise ValueError(f"ttt_e2e remat={self.remat!r} must be True or False")

  @classmethod
  def from_value(cls, value: TTTE2EConfig | Mapping[str, Any]) -> TTTE2EConfig:
    """A TTTE2EConfig, or a mapping of its fields (ml_collections configs pass dicts)."""
    if isinstance(value, cls):
      return value
    if not isinstance(value, Mapping):
      raise ValueError(f"ttt_e2e={value!r} must be a TTTE2EConfig or a dict of its fields")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - fields)
    if unknown:
      raise ValueError(f"ttt_e2e has unknown fields {unknown}; expected some of "
                       f"{sorted(fields)}")
    return cls(**value)

  def num_mutable(self, num_layers: int) -> int:
    # round first: 0.1 * 30 is 3.0000000000000004 in floating point, and means 3 blocks
    return math.ceil(round(num_layers * self.mutable_fraction, 9))

  def is_mutable(self, layer: int, num_layers: int) -> bool:
    return layer >= num_layers - self.num_mutable(num_layers)


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def swiglu(weights: dict[str, Array], x_BxTxD: Array, dtype) -> Array:
  """The mutable SwiGLU with per-row weights: W_down [silu(x W_gate) * (x W_up)], in `dtype`
  (as nnx.Linear computes, the weights and input cast to the compute dtype)."""
  w = {k: v.astype(dtype) for k, v in weights.items()}
  x = x_BxTxD.astype(dtype)
  gate_BxTxH = jnp.einsum("btd,bdh->bth", x, w["gate"])
  up_BxTxH = jnp.einsum("btd,bdh->bth", x, w["up"])
  return jnp.einsum("bth,bhd->btd", jax.nn.silu(gate_BxTxH) * up_BxTxH, w["down"])


def inner_loss(logits_BxMxV: Array, tokens_BxM: Array) -> Array:
  """Sum over rows of each row's mean next-token cross-entropy over the M - 1 pairs inside the
  mini-batch (its gradient w.r.t. per-row weights is each row's own mean-loss gradient)."""
  acc = jnp.promote_types(logits_BxMxV.dtype, jnp.float32)
  logp_BxMxV = jax.nn.log_softmax(logits_BxMxV[:, :-1].astype(acc), axis=-1)
  nll_BxM = -jnp.take_along_axis(logp_BxMxV, tokens_BxM[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(jnp.mean(nll_BxM, axis=1))


def global_norms(grads: MutableWeights) -> Array:
  """[B]: each row's gradient norm over all mutable weights. Its derivative is finite at a zero
  gradient too (the square root is not differentiated there), so second order stays finite."""
  wide = lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32))
  sumsq_B = sum(jnp.sum(jnp.square(wide(g)).reshape(g.shape[0], -1), axis=1)
                for g in jax.tree.leaves(grads))
  positive = sumsq_B > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sumsq_B, 1.0)), 0.0)


def sgd_step(weights: MutableWeights, grads: MutableWeights, config: TTTE2EConfig
             ) -> MutableWeights:
  """W - inner_lr * g * min(1, clip_norm / ||g||), ||g|| per row over all mutable weights."""
  if math.isinf(config.clip_norm):
    scale_B = jnp.ones((jax.tree.leaves(grads)[0].shape[0],), jnp.float32)
  else:
    scale_B = config.clip_norm / jnp.maximum(global_norms(grads), config.clip_norm)  # 1: unclipped

  def step(w, g):
    scale = scale_B.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)
    return (w - config.inner_lr * scale * g).astype(w.dtype)

  return jax.tree.map(step, weights, grads)


def inner_step(run: Run, weights: MutableWeights, caches, x_BxMxD: Array, tokens_BxM: Array,
               config: TTTE2EConfig) -> tuple[Array, Any, MutableWeights]:
  """One complete mini-batch: its logits (with `weights`), the caches after it and the stepped
  weights."""

  def loss(w):
    logits, new_caches = run(w, caches, x_BxMxD)
    return inner_loss(logits, tokens_BxM), (logits, new_caches)

  (_, (logits, caches)), grads = jax.value_and_grad(loss, has_aux=True)(weights)
  return logits, caches, sgd_step(weights, grads, config)


def stream(run: Run, weights: MutableWeights, caches, x_BxTxD: Array, tokens_BxT: Array,
           config: TTTE2EConfig, *, step_last: bool):
  """T more tokens from a mini-batch boundary: a lax.scan of inner steps over the complete
  mini-batches, then the rest (a partial mini-batch; or, when not `step_last`, the last
  complete one, whose step nobody would use) with the weights reached, without a step.

  Returns (logits [B, T, V], weights, caches at the start of the unstepped rest, caches after
  all T tokens)."""
  m = config.mini_batch
  b, t = tokens_BxT.shape
  full, rest = divmod(t, m)
  scanned = full if step_last or rest else full - 1
  parts = []
  if scanned:
    def body(carry, xs):
      weights, caches = carry
      logits, caches, weights = inner_step(run, weights, caches, *xs, config)
      return (weights, caches), logits

    if config.remat:
      body = jax.checkpoint(body, prevent_cse=False)   # safe inside scan
    n = scanned * m
    chunk = lambda a: jnp.moveaxis(a[:, :n].reshape((b, scanned, m) + a.shape[2:]), 1, 0)
    (weights, caches), logits_NxBxMxV = jax.lax.scan(
        body, (weights, caches), (chunk(x_BxTxD), chunk(tokens_BxT)))
    parts.append(jnp.moveaxis(logits_NxBxMxV, 0, 1).reshape(b, n, -1))
  rest_start = caches
  if scanned * m < t:
    logits, caches = run(weights, caches, x_BxTxD[:, scanned * m:])
    parts.append(logits)
  logits = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
  return logits, weights, rest_start, caches
