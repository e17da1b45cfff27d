"""Recurrent decoding of the TNT op: prefill + token steps == the parallel op (float64)."""

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp

from tests.helpers import assert_trees_rel_close
from tests.ops.test_tnt import GLOBAL, tnt_inputs
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.memory.rules import Gates
from tnt_jax.ops import decode
from tnt_jax.ops.tnt import LocalMemory, TNTConfig, tnt_op

# Shards of 8 so that alignment = lcm(8, 2, 8, 4, 8) = 8: prefills can restart mid-stream.
LOCALS = (
    LocalMemory(MemoryConfig(MemoryModel("mlp", expansion=2.0), UpdateRule("titans"), "l2",
                             "cumulative", 2), shard_length=8),
    LocalMemory(MemoryConfig(MemoryModel("swiglu", expansion=2.0),
                             UpdateRule("lact", momentum=True, muon=True), "l2", "chunk_start",
                             4), shard_length=8),
    LocalMemory(MemoryConfig(MemoryModel("linear", bias=True), UpdateRule("gd"), "dot",
                             "cumulative", 1), shard_length=4),
)
CONFIGS = {
    "titans_c4": TNTConfig(MemoryConfig(MemoryModel("mlp", expansion=2.0), UpdateRule("titans"),
                                        "l2", "cumulative", 4)),
    "lact_global": TNTConfig(MemoryConfig(MemoryModel("swiglu", expansion=2.0),
                                          UpdateRule("lact", momentum=True), "l2",
                                          "chunk_start", 4)),
    "tnt_3_locals_qk": TNTConfig(GLOBAL, LOCALS, qk_projection=True),
    "tnt_1_local_no_qk": TNTConfig(GLOBAL, LOCALS[:1], qk_projection=False),
}
LENGTH = 21   # crosses global chunks (8) and local shards (4, 8) several times


def _token(x, t):
  return x[:, t]


def _gates_at(gates, t):
  return tuple(Gates(*(None if g is None else g[:, t] for g in gate)) for gate in gates)


class DecodeTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    jax.config.update("jax_enable_x64", True)
    self.addCleanup(jax.config.update, "jax_enable_x64", False)

  def _parallel(self, config, args):
    return jax.jit(lambda *a: tnt_op(*a, config))(*args)[0]

  @parameterized.named_parameters(
      *[(f"{name}_prefill{p}", name, p) for name in CONFIGS for p in (0, 13)],
      ("tnt_3_locals_qk_prefill5", "tnt_3_locals_qk", 5),
      ("tnt_3_locals_qk_prefill8", "tnt_3_locals_qk", 8))
  def test_prefill_then_token_steps_equal_parallel(self, name, prefill):
    config = CONFIGS[name]
    q, k, v, gates, state, inits, slows = tnt_inputs(config, LENGTH, seed=len(name))
    want = self._parallel(config, (q, k, v, gates, state, inits, slows))
    cut = lambda x: None if x is None else x[:, :prefill]
    if prefill:
      out, dstate = jax.jit(lambda *a: decode.tnt_prefill(*a, config))(
          cut(q), cut(k), cut(v), tuple(Gates(*map(cut, g)) for g in gates), state, inits,
          slows)
      assert_trees_rel_close(self, out, want[:, :prefill], 1e-6, "prefill")
    else:
      dstate = decode.init_decode_state(state, inits, config)
    step = jax.jit(lambda *a: decode.tnt_decode_step(*a, config))
    for t in range(prefill, LENGTH):
      self.assertEqual(int(dstate.position), t)
      o, dstate = step(q[:, t], k[:, t], v[:, t], _gates_at(gates, t), dstate, inits, slows)
      assert_trees_rel_close(self, o, want[:, t], 1e-6, f"token {t}")

  @parameterized.named_parameters(*[(name, name) for name in CONFIGS])
  def test_chunked_streaming_equals_parallel(self, name):
    """Prefill 8 tokens, 3 steps, 5 steps (back at 16, aligned), then prefill the rest."""
    config = CONFIGS[name]
    self.assertEqual(16 % decode.alignment(config), 0)
    q, k, v, gates, state, inits, slows = tnt_inputs(config, LENGTH, seed=7)
    want = self._parallel(config, (q, k, v, gates, state, inits, slows))
    part = lambda x, lo, hi: None if x is None else x[:, lo:hi]
    segment = lambda lo, hi: (part(q, lo, hi), part(k, lo, hi), part(v, lo, hi),
                              tuple(Gates(*(part(x, lo, hi) for x in g)) for g in gates))
    out, dstate = decode.tnt_prefill(*segment(0, 8), state, inits, slows, config)
    outs = [out]
    for t in range(8, 16):
      o, dstate = decode.tnt_decode_step(q[:, t], k[:, t], v[:, t], _gates_at(gates, t), dstate,
                                         inits, slows, config)
      outs.append(o[:, None])
    out, dstate = decode.tnt_prefill(*segment(16, LENGTH), decode.carry_state(
        dstate.global_carry), inits, slows, config, position=dstate.position)
    outs.append(out)
    self.assertEqual(int(dstate.position), LENGTH)
    assert_trees_rel_close(self, jnp.concatenate(outs, axis=1), want, 1e-6, "stream")

  def test_alignment(self):
    self.assertEqual(decode.alignment(CONFIGS["tnt_3_locals_qk"]), 8)
    self.assertEqual(decode.alignment(CONFIGS["titans_c4"]), 4)


if __name__ == "__main__":
  absltest.main()
