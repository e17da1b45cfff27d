"""Titans MAG and MAL mixers (tnt_jax/layers/hybrid.py): exact causality by gradient, each
equals its definition written out from its parts, and bad kinds raise."""

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tnt_jax.layers.attention import AttentionConfig
from tnt_jax.layers.configs import preset
from tnt_jax.layers.hybrid import HybridConfig, HybridMixer
from tnt_jax.models import LMConfig

D, HEADS, T = 16, 2, 24


def _mixer(kind, memory_kind, seed=0):
  memory = preset(memory_kind, d_model=D, num_heads=HEADS,
                  **(dict(global_chunk=8, local_chunks=(2,), shard_lengths=8)
                     if memory_kind == "tnt" else dict(chunk_size=4)))
  config = HybridConfig(kind, memory, AttentionConfig(d_model=D, num_heads=HEADS, window=5))
  return HybridMixer(config, rngs=nnx.Rngs(seed), dtype=jnp.float32)


class HybridTest(parameterized.TestCase):

  @parameterized.named_parameters(("mag_tnt", "mag", "tnt"), ("mal_titans", "mal", "titans"),
                                  ("mal_tnt", "mal", "tnt"))
  def test_output_at_t_has_zero_gradient_from_later_inputs(self, kind, memory_kind):
    mixer = _mixer(kind, memory_kind)
    x = jax.random.normal(jax.random.key(1), (1, T, D))
    grad_at = jax.jit(jax.grad(lambda x, t: jnp.sum(jax.lax.dynamic_index_in_dim(mixer(x), t, 1))))
    for t in (0, 7, 15):
      grad = grad_at(x, t)
      np.testing.assert_array_equal(grad[:, t + 1:], 0.0)
      self.assertGreater(float(jnp.max(jnp.abs(grad[:, :t + 1]))), 0.0)

  def test_definitions(self):
    x = jax.random.normal(jax.random.key(2), (2, T, D))
    mag = _mixer("mag", "tnt")
    attended, remembered = jax.jit(mag.attention)(x), jax.jit(mag.memory)(x)
    rms = lambda y: y / jnp.sqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(jax.jit(mag)(x), rms(attended) * jax.nn.sigmoid(rms(remembered)),
                               rtol=1e-5, atol=1e-6)
    mal = _mixer("mal", "titans")
    np.testing.assert_allclose(jax.jit(mal)(x), jax.jit(mal.attention)(jax.jit(mal.memory)(x)),
                               rtol=1e-6)

  def test_swa_options_give_every_hybrid_persistent_tokens(self):
    config = LMConfig(vocab_size=8, d_model=D, num_layers=4, num_heads=HEADS, window=8,
                      pattern=("mag:titans", "mal:titans", "mac:titans", "swa"),
                      mixer_options={"titans": dict(chunk_size=4),
                                     "swa": dict(persistent_tokens=2)})
    for layer in range(4):
      attention = [p for p in config.mixer_parts(layer) if isinstance(p, AttentionConfig)]
      self.assertEqual([a.persistent_tokens for a in attention], [2])

  def test_bad_hybrids_raise(self):
    memory = preset("titans", d_model=D, num_heads=HEADS, chunk_size=4)
    with self.assertRaisesRegex(ValueError, "hybrid kind='mac'.*MACConfig"):
      HybridConfig("mac", memory, AttentionConfig(d_model=D, num_heads=HEADS, window=5))
    with self.assertRaisesRegex(ValueError, "d_model=32 differ"):
      HybridConfig("mag", memory, AttentionConfig(d_model=32, num_heads=HEADS, window=5))
    with self.assertRaisesRegex(ValueError, "mixer 'mag:swa'.*hybrid mag/mal/mac:<memory "
                                            "kind>"):
      LMConfig(vocab_size=8, d_model=D, num_layers=1, num_heads=HEADS, pattern=("mag:swa",))


if __name__ == "__main__":
  absltest.main()
