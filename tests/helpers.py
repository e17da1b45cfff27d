"""Fresh random inputs for memory-op tests, and comparison helpers."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from tnt_jax.memory import Gates, MemoryConfig


def random_inputs(config: MemoryConfig, key, *, batch=2, length=13, heads=2, head_dim=4,
                  dtype=jnp.float32):
  """q, k, v, gates, state, slow for `config`, all random (momentum and biases too)."""
  counter = iter(range(1 << 30))
  next_key = lambda: jax.random.fold_in(key, next(counter))
  normal = lambda shape: jax.random.normal(next_key(), shape, dtype)
  shape = (batch, length, heads, head_dim)
  q, k, v = normal(shape), normal(shape), normal(shape)
  # The layers L2-normalise q and k; do the same so inner steps stay in a sane range.
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  gate = lambda scale: scale * jax.nn.sigmoid(normal((batch, length, heads)))
  needed = config.rule.required_gates()
  gates = Gates(theta=gate(0.2),
                eta=gate(1.0) if "eta" in needed else None,
                alpha=gate(0.3) if "alpha" in needed else None)
  weights = config.model.init_fast_weights(next_key(), heads, head_dim, dtype)
  weights = jax.tree.map(lambda w: w + 0.1 * normal(w.shape), weights)   # non-zero biases too
  state = config.init_state(weights, batch)
  state = state._replace(weights=jax.tree.map(lambda w: w + 0.05 * normal(w.shape),
                                              state.weights))
  if state.momentum is not None:
    state = state._replace(momentum=jax.tree.map(lambda m: 0.1 * normal(m.shape), state.momentum))
  slow = jax.tree.map(lambda p: p + 0.1 * normal(p.shape),
                      config.model.init_slow_params(heads, head_dim, dtype))
  return q, k, v, gates, state, slow


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_trees_rel_close(testcase, got, want, tol, what=""):
  """Relative Frobenius error of each leaf below tol; both trees finite and non-trivial."""
  got_leaves, got_def = jax.tree.flatten(got)
  want_leaves, want_def = jax.tree.flatten(want)
  testcase.assertEqual(got_def, want_def, f"{what}: tree structures differ")
  for path_and_leaf, g in zip(jax.tree_util.tree_flatten_with_path(want)[0], got_leaves):
    path, w = path_and_leaf
    name = f"{what}{jax.tree_util.keystr(path)}"
    testcase.assertTrue(np.all(np.isfinite(np.asarray(g, np.float64))), f"{name}: not finite")
    testcase.assertGreater(float(np.abs(np.asarray(w, np.float64)).max()), 0.0,
                           f"{name}: reference is all zeros, the check would be vacuous")
    err = rel_err(g, w)
    testcase.assertLess(err, tol, f"{name}: relative error {err:.3e} >= {tol:.1e}")


def outputs_and_vjp(fn, args, seed=9):
  """fn(*args) and its vjp at a random cotangent (so every output's gradient path counts)."""
  outputs, vjp = jax.vjp(fn, *args)
  leaves, treedef = jax.tree.flatten(outputs)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  cot = jax.tree.unflatten(treedef, [jax.random.normal(key, x.shape, x.dtype)
                                     for key, x in zip(keys, leaves)])
  return outputs, vjp(cot)


def extend_in_pieces(decoder, ids, cache, bounds):
  """decoder.extend over ids[:, a:b] for consecutive (a, b) in bounds, from `cache`.

  Returns (the logits of every piece concatenated along time, the final cache).
  """
  logits = []
  for start, stop in zip(bounds[:-1], bounds[1:]):
    piece, cache = decoder.extend(ids[:, start:stop], cache)
    logits.append(piece)
  return jnp.concatenate(logits, axis=1), cache


def prefill_step_extend_step(prefill: int, aligned: tuple, length: int) -> list:
  """Piece bounds: a prefill of `prefill` tokens, single steps up to aligned[0], one extend over
  aligned = (start, stop), then single steps to `length`."""
  return ([0] + list(range(prefill, aligned[0] + 1)) + list(range(aligned[1], length + 1)))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(testcase, got, want):
  """Two lists of batch dicts: same length, same keys, identical arrays."""
  testcase.assertEqual(len(got), len(want))
  for g, w in zip(got, want):
    testcase.assertEqual(set(g), set(w))
    for key in w:
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


# A Pallas kernel in a jaxpr: pallas_call (Triton, TPU and interpreted kernels) or the mpmd_map /
# core_map that Mosaic GPU's plgpu.kernel traces to.
_KERNEL_PRIMITIVE = re.compile(r"\b(pallas_call|mpmd_map|core_map)\[")


def count_kernel_calls(jaxpr) -> int:
  return len(_KERNEL_PRIMITIVE.findall(str(jaxpr)))
