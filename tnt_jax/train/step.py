"""Pure train and eval steps over a pytree state {"params", "opt_state", "step"}."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tnt_jax.models.lm import LanguageModel


class ModelFunctions:
  """A model as pure functions of its parameters (a nested dict of arrays)."""

  def __init__(self, model: LanguageModel):
    self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
    self.template = params

  def initial_params(self) -> dict:
    return nnx.to_pure_dict(self.template)

  def apply(self, params: dict, tokens_BxT: jax.Array) -> jax.Array:
    state = jax.tree.map(lambda x: x, self.template)   # a fresh container to fill
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state, self.rest)(tokens_BxT)


def token_losses(model: ModelFunctions, params, batch, with_correct: bool = False):
  """Summed next-token cross-entropy (nats) and the number of scored tokens [and how many of
  them the argmax predicts]."""
  logits = model.apply(params, batch["inputs"])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  # where, not a product: a padded position's loss must not reach the sum even if it is NaN.
  total, count = jnp.sum(jnp.where(mask > 0, losses * mask, 0.0)), jnp.sum(mask)
  if not with_correct:
    return total, count
  right = (jnp.argmax(logits, axis=-1) == batch["targets"]) & (mask > 0)
  return total, count, jnp.sum(right.astype(jnp.float32))


def make_train_step(model: ModelFunctions, optimizer: optax.GradientTransformation):

  def loss_fn(params, batch):
    total, count = token_losses(model, params, batch)
    return total / jnp.maximum(count, 1.0)

  def train_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return train_step


def make_eval_step(model: ModelFunctions):

  def eval_step(params, batch):
    """(summed loss, scored tokens, argmax-correct tokens)."""
    return token_losses(model, params, batch, with_correct=True)

  return eval_step
