"""AdamW with warmup + cosine decay, global-norm clipping, a weight-decay mask, and a trainable
mask (TNT stage 2 trains the local memories only; frozen parameters get exactly zero updates)."""

from __future__ import annotations

from typing import Callable

import jax
import optax

# Parameters never decayed: norms, biases, convs, and each memory's learned initial state and
# slow params (decaying W_init toward zero would fight the memory's own learning).
NO_DECAY_KEYS = ("initial_weights", "slow", "conv", "scale", "bias")


def path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def decays(path, leaf) -> bool:
  return leaf.ndim >= 2 and not any(k in NO_DECAY_KEYS for k in path_keys(path))


def is_local_memory_param(path) -> bool:
  """A local memory's gate projection, W_init or slow params (memories[i >= 1] of a TNT layer)."""
  keys = path_keys(path)
  return any(k == "memories" and i + 1 < len(keys) and keys[i + 1] != "0"
             for i, k in enumerate(keys))


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.min_lr_ratio)


def make_optimizer(optim, total_steps: int, params,
                   trainable: Callable[[tuple, jax.Array], bool] | None = None
                   ) -> optax.GradientTransformation:
  """optim: lr, warmup_steps, min_lr_ratio, weight_decay, b1, b2, eps, clip_norm."""
  decay_mask = jax.tree_util.tree_map_with_path(decays, params)
  adamw = optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.adamw(learning_rate_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2,
                  eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask))
  if trainable is None:
    return adamw
  labels = jax.tree_util.tree_map_with_path(
      lambda path, leaf: "train" if trainable(path, leaf) else "frozen", params)
  if "train" not in jax.tree.leaves(labels):
    raise ValueError("the trainable mask selects no parameter (a stage-2 run of a model with no "
                     "local memories?)")
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
