"""Attention with Titans' persistent memory tokens (tnt_jax/layers/attention.py): equal to
attention written out with an explicit mask (full and sliding window, float64), causal and
windowed by gradient, the tokens learn, P = 0 keeps the parameters, and the context-parallel
path sees them too. Decoding: tests/models/test_decoding.py (swa_persistent)."""

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.helpers import assert_trees_rel_close
from tnt_jax.layers.attention import Attention, AttentionConfig, rope

D, HEADS, P, T = 16, 2, 3, 19


def _attention(window, persistent=P, seed=0, dtype=jnp.float64):
  config = AttentionConfig(d_model=D, num_heads=HEADS, window=window, persistent_tokens=persistent)
  return Attention(config, rngs=nnx.Rngs(seed), dtype=dtype)


def _reference(layer, x):
  """[persistent | x] keys, query t sees every persistent token and x_j for t - W < j <= t."""
  c = layer.config
  heads = lambda y: y.reshape(y.shape[:-1] + (c.num_heads, c.head_dim))
  pos = jnp.arange(x.shape[1])
  tokens = layer.persistent[...].astype(x.dtype)
  k_p = jnp.broadcast_to(heads(layer.k_proj(tokens)), (x.shape[0],) + (P, c.num_heads,
                                                                          c.head_dim))
  v_p = jnp.broadcast_to(heads(layer.v_proj(tokens)), k_p.shape)
  q = rope(heads(layer.q_proj(x)), pos, c.rope_base)
  keys = jnp.concatenate([k_p, rope(heads(layer.k_proj(x)), pos, c.rope_base)], axis=1)
  values = jnp.concatenate([v_p, heads(layer.v_proj(x))], axis=1)
  seen = pos[None, :] <= pos[:, None]
  if c.window is not None:
    seen &= pos[None, :] > pos[:, None] - c.window
  mask = jnp.concatenate([jnp.ones((x.shape[1], P), bool), seen], axis=1)
  scores = jnp.einsum("bthd,bshd->bhts", q, keys) / np.sqrt(c.head_dim)
  probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
  o = jnp.einsum("bhts,bshd->bthd", probs, values).reshape(x.shape[0], x.shape[1], -1)
  return layer.out_proj(o * jax.nn.silu(layer.gate_proj(x)))


class PersistentTokensTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    jax.config.update("jax_enable_x64", True)
    self.addCleanup(jax.config.update, "jax_enable_x64", False)

  @parameterized.named_parameters(("swa", 5), ("full", None))
  def test_equals_explicit_mask_attention_causal_and_learns(self, window):
    layer = _attention(window)
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (2, T, D), jnp.float64)
    got = jax.jit(lambda p: nnx.merge(graphdef, p)(x))(params)
    assert_trees_rel_close(self, got, _reference(layer, x), 1e-6, "out")
    grads = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x)))))(params)
    self.assertGreater(float(jnp.min(jnp.max(jnp.abs(grads["persistent"][...]), axis=-1))), 0.0)
    grad = jax.jit(jax.grad(lambda x, t: jnp.sum(jax.lax.dynamic_index_in_dim(layer(x), t, 1))))
    for t in range(T):
      g = grad(x[:1], t)[0]
      np.testing.assert_array_equal(g[t + 1:], 0.0, err_msg=f"t={t}")
      if window is not None:
        np.testing.assert_array_equal(g[:max(t - window + 1, 0)], 0.0, err_msg=f"t={t}")
      self.assertGreater(float(jnp.max(jnp.abs(g[t]))), 0.0)

  def test_no_persistent_tokens_keep_the_parameters(self):
    params = lambda layer: nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    plain, with_tokens = params(_attention(5, persistent=0)), params(_attention(5))
    self.assertEqual(set(with_tokens) - set(plain), {"persistent"})
    self.assertEqual(with_tokens.pop("persistent").shape, (P, D))
    # created last: the other parameters are those of the plain layer
    jax.tree.map(np.testing.assert_array_equal, with_tokens, plain)

  @parameterized.named_parameters(("swa", 5), ("full", None))
  def test_context_parallel_sees_them(self, window):
    jax.config.update("jax_enable_x64", False)
    layer = _attention(window, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(2), (2, 16, D))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("context",))
    spec = jax.sharding.PartitionSpec(None, "context")
    parallel = jax.jit(jax.shard_map(lambda x: layer(x, context_axis="context"), mesh=mesh,
                                     in_specs=spec, out_specs=spec))
    assert_trees_rel_close(self, parallel(x), jax.jit(layer)(x), 1e-5, "out")


if __name__ == "__main__":
  absltest.main()
