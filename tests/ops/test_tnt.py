"""The TNT op against its token-level reference, resets, and shards in parallel vs in a loop."""

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import assert_trees_rel_close, outputs_and_vjp, random_inputs
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.ops.api import memory_op
from tnt_jax.ops.tnt import LocalMemory, TNTConfig, local_memory_op, tnt_op

GLOBAL = MemoryConfig(MemoryModel("mlp", expansion=2.0), UpdateRule("titans"), "l2",
                      "chunk_start", 8)
LOCALS = (
    LocalMemory(MemoryConfig(MemoryModel("mlp", expansion=2.0), UpdateRule("titans"), "l2",
                             "cumulative", 2), shard_length=6),
    LocalMemory(MemoryConfig(MemoryModel("linear"), UpdateRule("gd"), "dot", "cumulative", 3),
                shard_length=9),
    LocalMemory(MemoryConfig(MemoryModel("swiglu", expansion=2.0),
                             UpdateRule("lact", momentum=True), "l2", "chunk_start", 4),
                # 3 chunks a shard: with 2, the last chunk's momentum gate only moves a state
                # that is reset before it is read, so its gradient is exactly zero.
                shard_length=12),
)


def tnt_inputs(config: TNTConfig, length, seed, dtype=jnp.float64):
  q, k, v, gates, state, slow = random_inputs(config.global_memory, jax.random.key(seed),
                                              length=length, dtype=dtype)
  gate_list, inits, slows = [gates], [], [slow]
  for i, local in enumerate(config.local_memories):
    _, _, _, g, s, sl = random_inputs(local.memory, jax.random.key(seed + 100 + i),
                                      length=length, dtype=dtype)
    gate_list.append(g)
    inits.append(jax.tree.map(lambda w: w[0], s.weights))
    slows.append(sl)
  return q, k, v, tuple(gate_list), state, tuple(inits), tuple(slows)


class TNTVsReferenceTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    jax.config.update("jax_enable_x64", True)
    self.addCleanup(jax.config.update, "jax_enable_x64", False)

  @parameterized.parameters((1, True, 23), (2, True, 17), (3, True, 25), (2, False, 23))
  def test_outputs_state_and_gradients(self, num_locals, qk_projection, length):
    config = TNTConfig(GLOBAL, LOCALS[:num_locals], qk_projection)
    args = tnt_inputs(config, length, seed=num_locals)

    def run(implementation):
      return outputs_and_vjp(lambda *a: tnt_op(*a, config, implementation=implementation),
                             args)

    (out, state), grads = jax.jit(lambda: run("xla"))()
    (ref_out, ref_state), ref_grads = jax.jit(lambda: run("reference"))()
    assert_trees_rel_close(self, out, ref_out, 1e-6, "output")
    assert_trees_rel_close(self, state, ref_state, 1e-6, "global_state")
    for name, g, r in zip(("q", "k", "v", "gates", "global_state", "local_init", "slows"),
                          grads, ref_grads):
      assert_trees_rel_close(self, g, r, 1e-6, f"d_{name}")


class ShardTest(parameterized.TestCase):

  def test_changing_one_shard_leaves_other_local_shards_alone(self):
    local = LOCALS[0]                      # shards of 6 tokens
    config = TNTConfig(GLOBAL, (local,), qk_projection=True)
    q, k, v, gates, state, inits, slows = tnt_inputs(config, 24, seed=4, dtype=jnp.float32)
    changed = lambda x: x.at[:, 6:12].set(x[:, 6:12] + 1.0)    # shard 1 only
    local_out = lambda q, k, v: local_memory_op(q, k, v, gates[1], inits[0], slows[1], local,
                                                True)
    base, moved = local_out(q, k, v), local_out(changed(q), changed(k), changed(v))
    diff = np.abs(np.asarray(moved - base)).max(axis=(0, 2, 3))
    np.testing.assert_array_equal(diff[:6], 0.0)
    np.testing.assert_array_equal(diff[12:], 0.0)
    self.assertGreater(diff[6:12].min(), 0.0)
    # The global memory (chunk 8, read at chunk start) only sees the change from the next chunk.
    glob = lambda q, k, v: memory_op(q, k, v, gates[0], state, slows[0], GLOBAL)[0]
    gdiff = np.abs(np.asarray(glob(changed(q), changed(k), changed(v)) - glob(q, k, v)))
    gdiff = gdiff.max(axis=(0, 2, 3))
    np.testing.assert_array_equal(gdiff[:6], 0.0)      # before the changed tokens
    self.assertGreater(gdiff[16:].min(), 0.0)          # chunks after the one holding them

  def test_parallel_shards_equal_a_loop_over_shards(self):
    local = LOCALS[1]                      # shards of 9 tokens
    config = TNTConfig(GLOBAL, (local,), qk_projection=True)
    q, k, v, gates, _, inits, slows = tnt_inputs(config, 25, seed=6, dtype=jnp.float32)
    parallel = local_memory_op(q, k, v, gates[1], inits[0], slows[1], local, True)
    pieces = []
    for start in range(0, 25, 9):
      cut = lambda x: x[:, start:start + 9]
      pieces.append(local_memory_op(cut(q), cut(k), cut(v), jax.tree.map(cut, gates[1]),
                                    inits[0], slows[1], local, True))
    assert_trees_rel_close(self, parallel, jnp.concatenate(pieces, axis=1), 1e-5, "shards")

  def test_bad_configs(self):
    with self.assertRaisesRegex(ValueError, "shard_length=10 must be a positive multiple"):
      LocalMemory(LOCALS[1].memory, shard_length=10)
    config = TNTConfig(GLOBAL, LOCALS[:2])
    q, k, v, gates, state, inits, slows = tnt_inputs(config, 12, seed=1, dtype=jnp.float32)
    with self.assertRaisesRegex(ValueError, "needs 3 gates"):
      tnt_op(q, k, v, gates[:2], state, inits, slows, config)


if __name__ == "__main__":
  absltest.main()
