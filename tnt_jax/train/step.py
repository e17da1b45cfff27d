"""Pure train and eval steps over a pytree state {"params", "opt_state", "step"}."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax.sharding import PartitionSpec as P

from tnt_jax.models.lm import LanguageModel
from tnt_jax.parallel.mesh import BATCH_AXES


class ModelFunctions:
  """A model as pure functions of its parameters (a nested dict of arrays)."""

  def __init__(self, model: LanguageModel):
    self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
    self.template = params

  def initial_params(self) -> dict:
    return nnx.to_pure_dict(self.template)

  def apply(self, params: dict, tokens_BxT: jax.Array, context_axis: str | None = None
            ) -> jax.Array:
    state = jax.tree.map(lambda x: x, self.template)   # a fresh container to fill
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state, self.rest)(tokens_BxT, context_axis=context_axis)


def token_losses(model: ModelFunctions, params, batch, with_correct: bool = False,
                 mesh: jax.sharding.Mesh | None = None):
  """Summed next-token cross-entropy (nats) and the number of scored tokens [and how many of
  them the argmax predicts]. With a mesh whose `context` axis has more than one device, the
  model runs context-parallel (tnt_jax/parallel/context.py) under shard_map. Otherwise the mesh
  is the trace's abstract mesh, so the memory ops' Pallas kernels run on each device's rows
  (ops/api.py: XLA cannot partition a kernel call)."""
  if mesh is None:
    return _losses(model.apply(params, batch["inputs"]), batch, with_correct)
  if mesh.shape.get("context", 1) > 1:
    return _context_parallel_losses(model, params, batch, with_correct, mesh)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return _losses(model.apply(params, batch["inputs"]), batch, with_correct)


def _context_parallel_losses(model, params, batch, with_correct, mesh):
  batch = {k: batch[k] for k in ("inputs", "targets", "loss_mask")}
  seq = P(BATCH_AXES, "context")

  def per_device(params, batch):
    logits = model.apply(params, batch["inputs"], context_axis="context")
    return tuple(x[None] for x in _losses(logits, batch, with_correct))

  # Each device returns its partial sums ([1] each, stacked over all devices) and they are
  # added outside: no psum inside, so the gradient of the replicated parameters is the plain
  # sum of the devices' contributions (shard_map's transpose of a replicated input).
  per_device_sums = jax.shard_map(
      per_device, mesh=mesh, in_specs=(jax.tree.map(lambda _: P(), params),
                                       {k: seq for k in batch}),
      out_specs=tuple(P(BATCH_AXES + ("context",)) for _ in range(3 if with_correct else 2)),
      check_vma=False)(params, batch)
  return tuple(jnp.sum(x) for x in per_device_sums)


def _losses(logits, batch, with_correct):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  # where, not a product: a padded position's loss must not reach the sum even if it is NaN.
  total, count = jnp.sum(jnp.where(mask > 0, losses * mask, 0.0)), jnp.sum(mask)
  if not with_correct:
    return total, count
  right = (jnp.argmax(logits, axis=-1) == batch["targets"]) & (mask > 0)
  return total, count, jnp.sum(right.astype(jnp.float32))


def make_train_step(model: ModelFunctions, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh | None = None):

  def loss_fn(params, batch):
    total, count = token_losses(model, params, batch, mesh=mesh)
    return total / jnp.maximum(count, 1.0)

  def train_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return train_step


def make_eval_step(model: ModelFunctions, mesh: jax.sharding.Mesh | None = None):

  def eval_step(params, batch):
    """(summed loss, scored tokens, argmax-correct tokens)."""
    return token_losses(model, params, batch, with_correct=True, mesh=mesh)

  return eval_step
