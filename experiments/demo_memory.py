r"""Demo of the deep-memory op: a memory that learns key -> value pairs while it reads.

    python -m experiments.demo_memory

The first half of the sequence writes random (key, value) pairs into the memory (theta > 0); the
second half asks for them back (theta = 0, the query is an earlier key). We print how well each
memory recalls and that the chunkwise-parallel op equals the token-level reference.
Runs on CPU in seconds. (The training issue replaces this with the real main job.)
"""

from absl import app, flags
import jax
import jax.numpy as jnp

from tnt_jax.memory import Gates, MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.ops.api import memory_op

flags.DEFINE_integer("pairs", 24, "key-value pairs written, then recalled")
flags.DEFINE_integer("head_dim", 32, "head dimension d")
flags.DEFINE_integer("heads", 4, "heads (independent memories)")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_float("lr", 0.5, "inner learning rate theta of the writes")
FLAGS = flags.FLAGS


def recall_task(key, pairs, heads, head_dim, lr):
  """q, k, v, theta for one sequence: pairs writes, then pairs reads."""
  k_key, v_key, perm_key = jax.random.split(key, 3)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  keys = unit(jax.random.normal(k_key, (1, pairs, heads, head_dim)))
  values = unit(jax.random.normal(v_key, (1, pairs, heads, head_dim)))
  order = jax.random.permutation(perm_key, pairs)
  q = jnp.concatenate([keys, keys[:, order]], axis=1)          # reads ask in a new order
  k = jnp.concatenate([keys, keys[:, order]], axis=1)
  v = jnp.concatenate([values, values[:, order]], axis=1)
  theta = jnp.concatenate([jnp.full((1, pairs, heads), lr), jnp.zeros((1, pairs, heads))], 1)
  return q, k, v, theta, values[:, order]


def main(argv):
  del argv
  pairs, heads, d = FLAGS.pairs, FLAGS.heads, FLAGS.head_dim
  q, k, v, theta, wanted = recall_task(jax.random.key(FLAGS.seed), pairs, heads, d, FLAGS.lr)
  print(f"{pairs} random unit key->value pairs per head, d={d}, {heads} heads; "
        "recall error = mean ||f(W; key) - value||^2 over the reads, before -> after the writes\n")
  print(f"{'memory':28s} {'chunk':>5s} {'recall err':>15s} {'max |xla - reference|':>22s}")
  for name, model in (("linear  f = W x", MemoryModel("linear")),
                      ("mlp     depth 2, hidden 4d", MemoryModel("mlp", expansion=4.0)),
                      ("swiglu  hidden 2d", MemoryModel("swiglu", expansion=2.0))):
    for chunk in (1, 8):
      config = MemoryConfig(model, UpdateRule("gd"), "l2", "cumulative", chunk)
      weights = model.init_fast_weights(jax.random.key(1), heads, d)
      state = config.init_state(weights, 1)
      untouched = memory_op(q, k, v, Gates(theta=0 * theta), state, {}, config)[0]
      gates = Gates(theta=theta)
      outs = {impl: memory_op(q, k, v, gates, state, {}, config, implementation=impl)[0]
              for impl in ("xla", "reference")}
      recall_err = lambda out: float(jnp.mean(jnp.sum((out[:, pairs:] - wanted) ** 2, -1)))
      err = f"{recall_err(untouched):.3f} -> {recall_err(outs['xla']):.3f}"
      diff = jnp.max(jnp.abs(outs["xla"] - outs["reference"]))
      print(f"{name:28s} {chunk:5d} {err:>15s} {float(diff):22.1e}")
  print("\nChunk 1 is online gradient descent; chunk 8 takes a chunk's gradients at its start "
        "state (parallel, but a coarser learner).")


if __name__ == "__main__":
  app.run(main)
