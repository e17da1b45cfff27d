"""memory_op rejects every bad input with a ValueError that names the offending value.

Each test builds valid inputs with `random_inputs`, checks that they are accepted, then corrupts
exactly one thing.
"""

import re

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp

from tests.helpers import random_inputs
from tnt_jax.memory import Gates, MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.ops.api import memory_op, validate_memory_inputs

MLP = MemoryModel("mlp", depth=2, expansion=2.0)
TITANS = MemoryConfig(MLP, UpdateRule("titans"), "l2", "cumulative", 4)
GD = MemoryConfig(MemoryModel("linear"), UpdateRule("gd"), "l2", "cumulative", 4)
LACT = MemoryConfig(MemoryModel("swiglu", expansion=2.0), UpdateRule("lact", momentum=True),
                    "dot", "chunk_start", 4)
TTT = MemoryConfig(MemoryModel("linear", residual_norm=True, bias=True), UpdateRule("gd"),
                   "l2", "cumulative", 4)
# random_inputs defaults: batch=2, length=13, heads=2, head_dim=4.
B, T, H, D = 2, 13, 2, 4


def _inputs(config):
  return random_inputs(config, jax.random.key(0))


class ValidInputsTest(parameterized.TestCase):
  """The uncorrupted inputs pass, so each rejection below is caused by the one corruption."""

  @parameterized.named_parameters(("titans", TITANS), ("gd", GD), ("lact", LACT), ("ttt", TTT))
  def test_valid_inputs_run(self, config):
    q, k, v, gates, state, slow = _inputs(config)
    for implementation in ("reference", "xla"):
      out, new_state = memory_op(q, k, v, gates, state, slow, config,
                                 implementation=implementation)
      chex.assert_shape(out, (B, T, H, D))
      chex.assert_trees_all_equal_shapes(new_state, state)
      self.assertTrue(bool(jnp.all(jnp.isfinite(out))))

  def test_slow_none_means_empty(self):
    q, k, v, gates, state, _ = _inputs(GD)
    out, _ = memory_op(q, k, v, gates, state, None, GD)
    chex.assert_shape(out, (B, T, H, D))


class InputValidationTest(parameterized.TestCase):

  def assert_rejected(self, regex, config, q, k, v, gates, state, slow, **kwargs):
    with self.assertRaisesRegex(ValueError, regex):
      memory_op(q, k, v, gates, state, slow, config, **kwargs)

  # --- q, k, v -----------------------------------------------------------------------------------

  def test_k_shape_differs_from_q(self):
    q, k, v, gates, state, slow = _inputs(TITANS)
    self.assert_rejected(re.escape(f"k.shape={(B, T - 1, H, D)}") + ".*"
                         + re.escape(f"q.shape={(B, T, H, D)}"),
                         TITANS, q, k[:, :-1], v, gates, state, slow)

  def test_v_shape_differs_from_q(self):
    q, k, v, gates, state, slow = _inputs(TITANS)
    self.assert_rejected(re.escape(f"v.shape={(B, T, H, D + 1)}"), TITANS, q, k,
                         jnp.concatenate([v, v[..., :1]], axis=-1), gates, state, slow)

  @parameterized.parameters(jnp.bfloat16, jnp.float16)
  def test_v_dtype_differs(self, dtype):
    q, k, v, gates, state, slow = _inputs(TITANS)
    self.assert_rejected(rf"v\.dtype={jnp.dtype(dtype).name}.*q\.dtype=float32", TITANS, q, k,
                         v.astype(dtype), gates, state, slow)

  def test_k_dtype_differs(self):
    q, k, v, gates, state, slow = _inputs(TITANS)
    self.assert_rejected(r"k\.dtype=bfloat16", TITANS, q, k.astype(jnp.bfloat16), v, gates,
                         state, slow)

  @parameterized.named_parameters(("3d", lambda q: q[0]), ("5d", lambda q: q[..., None]))
  def test_q_not_4d(self, corrupt):
    q, k, v, gates, state, slow = _inputs(TITANS)
    bad = corrupt(q)
    self.assert_rejected(r"q must be \[batch, time, heads, head_dim\].*"
                         + re.escape(str(tuple(bad.shape))), TITANS, bad, k, v, gates, state,
                         slow)

  def test_integer_inputs(self):
    q, k, v, gates, state, slow = _inputs(GD)
    as_int = lambda x: (10 * x).astype(jnp.int32)
    self.assert_rejected(r"q\.dtype=int32", GD, as_int(q), as_int(k), as_int(v), gates, state,
                         slow)

  def test_empty_sequence(self):
    q, k, v, gates, state, slow = _inputs(GD)
    empty = lambda x: x[:, :0]
    self.assert_rejected(r"length=0", GD, empty(q), empty(k), empty(v),
                         jax.tree.map(empty, gates), state, slow)

  # --- config ------------------------------------------------------------------------------------

  @parameterized.parameters(0, -1, 2.5, "4", None)
  def test_bad_chunk_size(self, chunk):
    with self.assertRaisesRegex(ValueError, re.escape(f"chunk_size={chunk!r}")):
      MemoryConfig(MLP, UpdateRule("titans"), "l2", "cumulative", chunk)

  def test_unknown_model_kind(self):
    with self.assertRaisesRegex(ValueError, r"kind='conv'"):
      MemoryModel("conv")

  def test_unknown_activation(self):
    with self.assertRaisesRegex(ValueError, r"activation='swish'"):
      MemoryModel("mlp", activation="swish")

  @parameterized.parameters(1, 0)
  def test_mlp_depth_too_small(self, depth):
    with self.assertRaisesRegex(ValueError, rf"depth={depth}\b"):
      MemoryModel("mlp", depth=depth)

  def test_nonpositive_expansion(self):
    with self.assertRaisesRegex(ValueError, r"expansion=0\.0"):
      MemoryModel("mlp", expansion=0.0)

  def test_unknown_rule_kind(self):
    with self.assertRaisesRegex(ValueError, r"kind='adam'"):
      UpdateRule("adam")

  def test_bad_ns_steps(self):
    with self.assertRaisesRegex(ValueError, r"ns_steps=0"):
      UpdateRule("lact", muon=True, ns_steps=0)

  def test_unknown_loss(self):
    with self.assertRaisesRegex(ValueError, r"loss='l1'"):
      MemoryConfig(MLP, UpdateRule("titans"), "l1", "cumulative", 4)

  def test_unknown_read_mode(self):
    with self.assertRaisesRegex(ValueError, r"read='chunk_end'"):
      MemoryConfig(MLP, UpdateRule("titans"), "l2", "chunk_end", 4)

  def test_lact_with_cumulative_read(self):
    with self.assertRaisesRegex(ValueError, r"rule='lact'.*read='cumulative'"):
      MemoryConfig(MLP, UpdateRule("lact"), "l2", "cumulative", 4)

  def test_config_not_a_memory_config(self):
    q, k, v, gates, state, slow = _inputs(GD)
    self.assert_rejected(r"MemoryConfig, got dict", {"chunk_size": 4}, q, k, v, gates, state,
                         slow)

  # --- gates -------------------------------------------------------------------------------------

  @parameterized.parameters("theta", "eta", "alpha")
  def test_missing_gate(self, name):
    q, k, v, gates, state, slow = _inputs(TITANS)
    self.assert_rejected(rf"rule='titans' needs gate {name}", TITANS, q, k, v,
                         gates._replace(**{name: None}), state, slow)

  def test_lact_momentum_needs_eta(self):
    q, k, v, gates, state, slow = _inputs(LACT)
    self.assert_rejected(r"rule='lact' needs gate eta", LACT, q, k, v, gates._replace(eta=None),
                         state, slow)

  @parameterized.parameters("eta", "alpha")
  def test_unexpected_gate(self, name):
    q, k, v, gates, state, slow = _inputs(GD)
    extra = 0.5 * jnp.ones_like(gates.theta) + 0.1 * gates.theta
    self.assert_rejected(rf"rule='gd'.*does not use gate {name}", GD, q, k, v,
                         gates._replace(**{name: extra}), state, slow)

  @parameterized.named_parameters(
      ("theta_heads", "theta", lambda g: g[:, :, :1], (B, T, 1)),
      ("eta_time", "eta", lambda g: g[:, 1:], (B, T - 1, H)),
      ("alpha_extra_axis", "alpha", lambda g: g[..., None], (B, T, H, 1)),
  )
  def test_gate_wrong_shape(self, name, corrupt, bad_shape):
    q, k, v, gates, state, slow = _inputs(TITANS)
    bad = gates._replace(**{name: corrupt(getattr(gates, name))})
    self.assert_rejected(re.escape(f"gate {name}.shape={bad_shape}") + ".*"
                         + re.escape(str((B, T, H))), TITANS, q, k, v, bad, state, slow)

  # --- state -------------------------------------------------------------------------------------

  def test_state_weights_wrong_head_count(self):
    q, k, v, gates, state, slow = _inputs(TITANS)
    one_head = lambda x: x[:, :1]
    bad = state._replace(weights=jax.tree.map(one_head, state.weights))
    h = MLP.hidden_dim(D)
    self.assert_rejected(r"state weights\['w0'\].*" + re.escape(str((B, 1, h, D))) + ".*"
                         + re.escape(str((B, H, h, D))), TITANS, q, k, v, gates, bad, slow)

  def test_state_weights_wrong_batch(self):
    q, k, v, gates, state, slow = _inputs(GD)
    bad = state._replace(weights=jax.tree.map(lambda x: x[:1], state.weights))
    self.assert_rejected(re.escape(str((1, H, D, D))), GD, q, k, v, gates, bad, slow)

  def test_state_for_another_model(self):
    q, k, v, gates, state, slow = _inputs(GD)
    other = MemoryConfig(MLP, UpdateRule("gd"), "l2", "cumulative", 4)
    mlp_state = _inputs(other)[4]
    self.assert_rejected(r"\['w0', 'w1'\].*'linear'", GD, q, k, v, gates, mlp_state, slow)

  def test_state_missing_bias(self):
    q, k, v, gates, state, slow = _inputs(TTT)
    bad = state._replace(weights={"w0": {"w": state.weights["w0"]["w"]}})
    self.assert_rejected(r"state weights\['w0'\].*'b'", TTT, q, k, v, gates, bad, slow)

  def test_momentum_none_for_titans(self):
    q, k, v, gates, state, slow = _inputs(TITANS)
    self.assert_rejected(r"rule='titans'.*state\.momentum is None", TITANS, q, k, v, gates,
                         state._replace(momentum=None), slow)

  def test_momentum_given_for_gd(self):
    q, k, v, gates, state, slow = _inputs(GD)
    momentum = jax.tree.map(lambda w: 0.1 * w, state.weights)
    self.assert_rejected(r"rule='gd'.*state\.momentum is set", GD, q, k, v, gates,
                         state._replace(momentum=momentum), slow)

  def test_momentum_wrong_shape(self):
    q, k, v, gates, state, slow = _inputs(TITANS)
    bad = state._replace(momentum=jax.tree.map(lambda m: m[:, :1], state.momentum))
    self.assert_rejected(r"state\.momentum", TITANS, q, k, v, gates, bad, slow)

  def test_slow_params_wrong_shape(self):
    q, k, v, gates, state, slow = _inputs(TTT)
    bad = dict(slow, ln_scale=slow["ln_scale"][:1])
    self.assert_rejected(r"slow params.*" + re.escape(str((1, D))), TTT, q, k, v, gates, state,
                         bad)

  def test_slow_params_missing(self):
    q, k, v, gates, state, _ = _inputs(TTT)
    self.assert_rejected(r"slow params.*ln_scale", TTT, q, k, v, gates, state, {})

  # --- keyword arguments -------------------------------------------------------------------------

  @parameterized.parameters("triton", "XLA", "")
  def test_unknown_implementation(self, implementation):
    q, k, v, gates, state, slow = _inputs(GD)
    self.assert_rejected(re.escape(f"implementation={implementation!r}"), GD, q, k, v, gates,
                         state, slow, implementation=implementation)

  @parameterized.parameters(0, -2, 1.5)
  def test_bad_unroll(self, unroll):
    q, k, v, gates, state, slow = _inputs(GD)
    self.assert_rejected(re.escape(f"unroll={unroll!r}"), GD, q, k, v, gates, state, slow,
                         unroll=unroll)

  def test_validation_runs_under_jit(self):
    """Validation uses shapes only, so it raises at trace time inside jit as well."""
    q, k, v, gates, state, slow = _inputs(TITANS)
    bad = gates._replace(theta=gates.theta[:, :, :1])
    fn = jax.jit(lambda q, k, v, g, s, sl: memory_op(q, k, v, g, s, sl, TITANS))
    with self.assertRaisesRegex(ValueError, r"gate theta\.shape"):
      fn(q, k, v, bad, state, slow)
    with self.assertRaisesRegex(ValueError, r"gate theta\.shape"):
      validate_memory_inputs(q, k, v, bad, state, slow, TITANS)


if __name__ == "__main__":
  absltest.main()
