"""implementation="affine" (ops/affine.py) against the token-level reference: outputs, final
states and every gradient, in float64; bf16 against float32; its fallback and its errors."""

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp

from tests.helpers import assert_trees_rel_close, outputs_and_vjp, random_inputs, rel_err
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.ops import affine
from tnt_jax.ops.api import memory_op

LINEAR = MemoryModel("linear")
LINEAR_BIAS = MemoryModel("linear", bias=True)


def _run(config, implementation, args, **kwargs):
  fn = lambda *a: memory_op(*a, config, implementation=implementation, **kwargs)
  return jax.jit(lambda args: outputs_and_vjp(fn, args))(args)


class AffineVsReferenceTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    jax.config.update("jax_enable_x64", True)
    self.addCleanup(jax.config.update, "jax_enable_x64", False)

  def check(self, config, length, seed, block_chunks=None, tol=1e-6, head_dim=4):
    args = random_inputs(config, jax.random.key(seed), length=length, head_dim=head_dim,
                         dtype=jnp.float64)
    if block_chunks is None:
      got = _run(config, "affine", args)
    else:
      fn = lambda *a: affine.affine_memory(*a, config, block_chunks=block_chunks)
      got = jax.jit(lambda args: outputs_and_vjp(fn, args))(args)
    want = _run(config, "reference", args)
    (out, state), grads = got
    (ref_out, ref_state), ref_grads = want
    assert_trees_rel_close(self, out, ref_out, tol, "output")
    assert_trees_rel_close(self, state, ref_state, tol, "final_state")
    names = ("d_q", "d_k", "d_v", "d_gates", "d_state", "d_slow")
    for name, g, ref_g in zip(names, grads, ref_grads):
      if name != "d_slow":   # a linear memory has no slow parameters
        assert_trees_rel_close(self, g, ref_g, tol, name)

  @parameterized.product(model=("linear", "linear_bias"), rule=("gd", "titans"),
                         read=("cumulative", "chunk_start"), loss=("l2", "dot"))
  def test_matches_reference(self, model, rule, read, loss):
    """19 tokens in chunks of 3: 7 chunks, the last partial; blocks of 3 (the default), so the
    last block is padded with identity chunks."""
    config = MemoryConfig(LINEAR_BIAS if model == "linear_bias" else LINEAR, UpdateRule(rule),
                          loss, read, 3)
    self.check(config, length=19, seed=len(model) * 7 + len(rule) + len(read) + len(loss))

  @parameterized.parameters(1, 2, 5, 7, 100)
  def test_block_sizes(self, block_chunks):
    """One chunk per block (a pure scan over blocks), a few, and one block for all 7 chunks."""
    config = MemoryConfig(LINEAR_BIAS, UpdateRule("titans"), "l2", "cumulative", 3)
    self.check(config, length=20, seed=block_chunks, block_chunks=block_chunks)

  def test_single_chunk_and_head_dim_16(self):
    config = MemoryConfig(LINEAR, UpdateRule("titans"), "l2", "cumulative", 16)
    self.check(config, length=9, seed=3, head_dim=16)

  def test_many_chunks(self):
    """64 chunks of 1 token: 8 blocks of 8, deep enough for the composed maps to matter."""
    config = MemoryConfig(LINEAR, UpdateRule("titans"), "l2", "cumulative", 1)
    self.check(config, length=64, seed=4)


class AffineDtypesAndRoutingTest(parameterized.TestCase):

  @parameterized.parameters("gd", "titans")
  def test_bf16_close_to_float32_reference(self, rule):
    config = MemoryConfig(LINEAR, UpdateRule(rule), "l2", "cumulative", 8)
    args = random_inputs(config, jax.random.key(5), length=200, heads=3, head_dim=16)
    out32, state32 = memory_op(*args, config, implementation="reference")
    q, k, v = (x.astype(jnp.bfloat16) for x in args[:3])
    out16, state16 = memory_op(q, k, v, *args[3:], config, implementation="affine")
    self.assertEqual(out16.dtype, jnp.bfloat16)
    for leaf in jax.tree.leaves(state16):
      self.assertEqual(leaf.dtype, jnp.float32)
    self.assertLess(rel_err(out16.astype(jnp.float32), out32), 2e-2)
    for a, b in zip(jax.tree.leaves(state16), jax.tree.leaves(state32)):
      self.assertLess(rel_err(a, b), 2e-2)

  def test_two_halves_equal_one_pass(self):
    config = MemoryConfig(LINEAR_BIAS, UpdateRule("titans"), "l2", "cumulative", 4)
    q, k, v, gates, state, slow = random_inputs(config, jax.random.key(8), length=24)
    whole = memory_op(q, k, v, gates, state, slow, config, implementation="affine")
    half = lambda x: (x[:, :12], x[:, 12:])
    (q1, q2), (k1, k2), (v1, v2) = half(q), half(k), half(v)
    g1, g2 = (type(gates)(*(None if g is None else half(g)[i] for g in gates)) for i in (0, 1))
    out1, mid = memory_op(q1, k1, v1, g1, state, slow, config, implementation="affine")
    out2, final = memory_op(q2, k2, v2, g2, mid, slow, config, implementation="affine")
    assert_trees_rel_close(self, (jnp.concatenate([out1, out2], 1), final), whole, 1e-5,
                           "halves")

  @parameterized.parameters(
      (MemoryModel("mlp", expansion=2.0), UpdateRule("titans"), "l2", "not linear"),
      (MemoryModel("linear", residual_norm=True), UpdateRule("gd"), "l2", "LayerNorm"),
      (LINEAR, UpdateRule("lact"), "l2", "normalises"))
  def test_unsupported_memories_fall_back_or_raise(self, model, rule, loss, words):
    read = "chunk_start" if rule.kind == "lact" else "cumulative"
    config = MemoryConfig(model, rule, loss, read, 4)
    self.assertIn(words, affine.unsupported_reason(config))
    args = random_inputs(config, jax.random.key(2), length=9)
    with self.assertLogs(level="WARNING") as logs:
      got = memory_op(*args, config, implementation="affine")
    self.assertTrue(any("running the xla path instead" in line and words in line
                        for line in logs.output))
    assert_trees_rel_close(self, got, memory_op(*args, config, implementation="xla"), 1e-6,
                           "fallback")
    with self.assertRaisesRegex(ValueError, "implementation='affine' cannot run"):
      affine.affine_memory(*args, config)

  def test_bf16_3x_maps_match_highest_in_float32(self):
    """map_precision="bf16_3x" (tensor-core products, three bf16 passes) stays at float32-level
    accuracy: within 1e-5 of the float32 maps, well below bf16's 4e-3. The chunk step's own
    float32 matmuls run at float32 here too: at the GPU's default (TF32) they round the start
    states' last bits differently and the outputs of the two runs differ by ~2e-5 (H100)."""
    config = MemoryConfig(LINEAR_BIAS, UpdateRule("titans"), "l2", "cumulative", 2)
    args = random_inputs(config, jax.random.key(6), length=64, heads=2, head_dim=16)
    run = lambda precision: jax.jit(lambda args: affine.affine_memory(
        *args, config, map_precision=precision))(args)
    with jax.default_matmul_precision("float32"):
      assert_trees_rel_close(self, run("bf16_3x"), run("highest"), 1e-5, "bf16_3x")

  def test_bad_map_precision(self):
    config = MemoryConfig(LINEAR, UpdateRule("gd"), "l2", "cumulative", 4)
    args = random_inputs(config, jax.random.key(2), length=9)
    with self.assertRaisesRegex(ValueError, "map_precision='fp8' is unknown"):
      affine.affine_memory(*args, config, map_precision="fp8")

  @parameterized.parameters(0, -2, 1.5, True)
  def test_bad_block_chunks(self, block_chunks):
    config = MemoryConfig(LINEAR, UpdateRule("gd"), "l2", "cumulative", 4)
    args = random_inputs(config, jax.random.key(2), length=9)
    with self.assertRaisesRegex(ValueError, "block_chunks"):
      affine.affine_memory(*args, config, block_chunks=block_chunks)


if __name__ == "__main__":
  absltest.main()
