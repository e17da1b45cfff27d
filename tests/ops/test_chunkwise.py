"""The chunkwise op against the token-level reference: outputs, final states, all gradients."""

import itertools
import zlib

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp

from tests.helpers import assert_trees_rel_close, random_inputs, rel_err
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.ops.api import memory_op

MODELS = {
    "linear": MemoryModel("linear"),
    "mlp": MemoryModel("mlp", depth=2, expansion=2.0),
    "swiglu": MemoryModel("swiglu", expansion=2.0),
    "ttt_linear": MemoryModel("linear", residual_norm=True, bias=True),
    "ttt_mlp3": MemoryModel("mlp", depth=3, expansion=2.0, residual_norm=True, bias=True,
                            activation="silu"),
}
RULE_READS = {
    "gd_cumulative": (UpdateRule("gd"), "cumulative"),
    "gd_chunk_start": (UpdateRule("gd"), "chunk_start"),
    "titans_cumulative": (UpdateRule("titans"), "cumulative"),
    "titans_chunk_start": (UpdateRule("titans"), "chunk_start"),
    "lact_momentum_muon": (UpdateRule("lact", momentum=True, muon=True), "chunk_start"),
    "lact_plain": (UpdateRule("lact", momentum=False), "chunk_start"),
}


def _seed(*names) -> int:
  """A seed per test case that is the same in every process (unlike hash())."""
  return zlib.crc32("/".join(map(str, names)).encode()) % 100_000


def _fwd_and_grads(config, implementation, args, cotangent_seed):
  """Outputs, final state and the vjp w.r.t. every input, for one implementation."""
  def run(q, k, v, gates, state, slow):
    # unroll=1 keeps CPU compiles small; unrolling is checked on its own below.
    return memory_op(q, k, v, gates, state, slow, config, implementation=implementation,
                     unroll=None if implementation == "reference" else 1)

  @jax.jit
  def fwd_bwd(args):
    outputs, vjp = jax.vjp(run, *args)
    leaves, treedef = jax.tree.flatten(outputs)
    keys = jax.random.split(jax.random.key(cotangent_seed), len(leaves))
    cotangent = jax.tree.unflatten(
        treedef, [jax.random.normal(key, x.shape, x.dtype) for key, x in zip(keys, leaves)])
    return outputs, vjp(cotangent)

  return fwd_bwd(args)


class ChunkwiseVsReferenceTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    jax.config.update("jax_enable_x64", True)
    self.addCleanup(jax.config.update, "jax_enable_x64", False)

  def check(self, config, length, seed, head_dim=4, tol=1e-6):
    args = random_inputs(config, jax.random.key(seed), length=length, head_dim=head_dim,
                         dtype=jnp.float64)
    (out, state), grads = _fwd_and_grads(config, "xla", args, seed + 1)
    (ref_out, ref_state), ref_grads = _fwd_and_grads(config, "reference", args, seed + 1)
    assert_trees_rel_close(self, out, ref_out, tol, "output")
    assert_trees_rel_close(self, state, ref_state, tol, "final_state")
    names = ("d_q", "d_k", "d_v", "d_gates", "d_state", "d_slow")
    for name, g, ref_g in zip(names, grads, ref_grads):
      assert_trees_rel_close(self, g, ref_g, tol, name)

  @parameterized.parameters("gd_cumulative", "titans_cumulative", "lact_momentum_muon")
  def test_checkpointed_chunk_groups_match_reference(self, rule_read):
    """Scans of more than 16 chunks run as checkpointed groups (25 chunks -> 5 groups of 5,
    the last chunk partial); outputs, states and gradients still equal the reference."""
    rule, read = RULE_READS[rule_read]
    config = MemoryConfig(MODELS["mlp"], rule, "l2", read, chunk_size=2)
    self.check(config, length=49, seed=_seed("groups", rule_read))

  @parameterized.product(model=("linear", "mlp", "swiglu"), loss=("l2", "dot"),
                         rule_read=tuple(RULE_READS)[:5], chunk=(1, 3, 16))
  def test_matches_reference(self, model, loss, rule_read, chunk):
    rule, read = RULE_READS[rule_read]
    config = MemoryConfig(MODELS[model], rule, loss, read, chunk)
    # 19 is a multiple of none of the chunk sizes: the last chunk is always partial.
    self.check(config, length=19, seed=_seed(model, loss, rule_read, chunk))

  @parameterized.product(model=("ttt_linear", "ttt_mlp3"), rule_read=tuple(RULE_READS))
  def test_residual_norm_bias_variants(self, model, rule_read):
    rule, read = RULE_READS[rule_read]
    self.check(MemoryConfig(MODELS[model], rule, "l2", read, 4), length=11,
               seed=_seed(model, rule_read))

  @parameterized.parameters("titans_cumulative", "lact_momentum_muon")
  def test_head_dim_60(self, rule_read):
    rule, read = RULE_READS[rule_read]
    config = MemoryConfig(MemoryModel("mlp", expansion=1.0), rule, "l2", read, 8)
    self.check(config, length=21, seed=7, head_dim=60)


class StreamingAndDtypeTest(parameterized.TestCase):

  @parameterized.parameters(*itertools.product(("titans_cumulative", "gd_chunk_start",
                                                "lact_momentum_muon"), (1, 4)))
  def test_two_halves_equal_one_pass(self, rule_read, chunk):
    rule, read = RULE_READS[rule_read]
    config = MemoryConfig(MODELS["mlp"], rule, "l2", read, chunk)
    q, k, v, gates, state, slow = random_inputs(config, jax.random.key(3), length=20)
    whole, whole_state = memory_op(q, k, v, gates, state, slow, config)
    split = 8   # a multiple of the chunk: the chunk grid is the same in both runs
    first = lambda x: None if x is None else x[:, :split]
    second = lambda x: None if x is None else x[:, split:]
    out1, mid = memory_op(first(q), first(k), first(v), jax.tree.map(first, gates), state,
                          slow, config)
    out2, end = memory_op(second(q), second(k), second(v), jax.tree.map(second, gates), mid,
                          slow, config)
    assert_trees_rel_close(self, jnp.concatenate([out1, out2], axis=1), whole, 1e-5, "output")
    assert_trees_rel_close(self, end, whole_state, 1e-5, "state")

  @parameterized.parameters(*itertools.product(("titans_cumulative", "lact_momentum_muon"),
                                                (None, 2, 5)))
  def test_unroll_does_not_change_results(self, rule_read, unroll):
    rule, read = RULE_READS[rule_read]
    config = MemoryConfig(MODELS["mlp"], rule, "l2", read, 2)
    args = random_inputs(config, jax.random.key(11), length=11)
    want = memory_op(*args, config, unroll=1)
    assert_trees_rel_close(self, memory_op(*args, config, unroll=unroll), want, 1e-6, "unroll")

  @parameterized.parameters("titans_cumulative", "gd_chunk_start", "lact_momentum_muon")
  def test_bf16_close_to_float32(self, rule_read):
    rule, read = RULE_READS[rule_read]
    config = MemoryConfig(MODELS["mlp"], rule, "l2", read, 8)
    args = random_inputs(config, jax.random.key(5), length=40, heads=3, head_dim=16)
    out32, state32 = memory_op(*args, config)
    q, k, v = (x.astype(jnp.bfloat16) for x in args[:3])
    out16, state16 = memory_op(q, k, v, *args[3:], config)
    self.assertEqual(out16.dtype, jnp.bfloat16)
    for leaf in jax.tree.leaves(state16):
      self.assertEqual(leaf.dtype, jnp.float32)   # the state stays float32
    self.assertTrue(bool(jnp.all(jnp.isfinite(out16.astype(jnp.float32)))))
    self.assertLess(rel_err(out16.astype(jnp.float32), out32), 2e-2)
    for a, b in zip(jax.tree.leaves(state16), jax.tree.leaves(state32)):
      self.assertLess(rel_err(a, b), 2e-2)


if __name__ == "__main__":
  absltest.main()
