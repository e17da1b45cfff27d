"""Parallel forward == streaming in aligned segments == token-by-token decoding, for every
mixer of the LM (float64, 1e-6), and greedy generation == argmax of the parallel logits."""

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.helpers import assert_trees_rel_close, extend_in_pieces, prefill_step_extend_step
from tnt_jax.models import LMConfig, LanguageModel
from tnt_jax.models.decoding import Decoder
from tnt_jax.models.sampling import sample

LENGTH = 20
OPTIONS = {
    # C_G 8, locals C_L 2 and 4 with shards of 8 (resets at 8 and 16), Q-K projection on
    "tnt": dict(global_chunk=8, local_chunks=(2, 4), shard_lengths=8),
    "titans": dict(chunk_size=4),
    "ttt_linear": dict(chunk_size=4),
    "ttt_mlp": dict(chunk_size=2),
    "lact": dict(chunk_size=8),
    "lact_hybrid": dict(chunk_size=8),   # + sliding-window attention of 8 over its q, k, v
}
PATTERNS = {name: (name,) for name in OPTIONS} | {
    "attention": ("attention",), "swa": ("swa",), "swa+tnt": ("swa", "tnt"),
    "mag_tnt": ("mag:tnt",), "mal_titans": ("mal:titans",),
    # Titans MAC: segments of window = 8 tokens (so 8 is aligned); persistent memory tokens
    "mac_titans": ("mac:titans",), "mac_tnt": ("mac:tnt",), "swa_persistent": ("swa",)}
EXTRA = {"mac_titans": dict(window=8),
         "mac_tnt": dict(window=8, options={"swa": dict(persistent_tokens=3)}),
         "swa_persistent": dict(options={"swa": dict(persistent_tokens=3)})}


def make_model(pattern, seed=0, window=6, options=None):
  config = LMConfig(vocab_size=11, d_model=16, num_layers=2, num_heads=2, pattern=pattern,
                    mixer_options={k: v for k, v in OPTIONS.items()
                                   if k in (p.partition(":")[2] or p for p in pattern)}
                    | (options or {}),
                    window=window, dtype="float64")
  return LanguageModel(config, rngs=nnx.Rngs(seed))


class DecodingTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    jax.config.update("jax_enable_x64", True)
    self.addCleanup(jax.config.update, "jax_enable_x64", False)

  @parameterized.named_parameters(*[(name, name) for name in PATTERNS])
  def test_parallel_equals_streaming_equals_decoding(self, name):
    model = make_model(PATTERNS[name], **EXTRA.get(name, {}))
    tokens = jax.random.randint(jax.random.key(1), (2, LENGTH), 0, 11)
    want = model(tokens)
    decoder = Decoder(model, max_length=LENGTH)
    self.assertEqual(8 % decoder.alignment, 0)   # so that position 8 is aligned
    # An unaligned prefill from 0, steps across chunk ends to position 8, an aligned 8-token
    # extend (local shards reset at 8 and 16), then steps to the end.
    got, cache = extend_in_pieces(decoder, tokens, decoder.init_cache(2),
                                  prefill_step_extend_step(5, (8, 16), LENGTH))
    self.assertEqual(int(cache["position"]), LENGTH)
    assert_trees_rel_close(self, got, want, 1e-6, name)

  def test_greedy_generation_is_argmax_of_the_parallel_logits(self):
    model = make_model(("swa", "tnt"), seed=3)
    prompt = np.asarray(jax.random.randint(jax.random.key(2), (2, 7), 0, 11))
    decoder = Decoder(model)
    generated = np.stack(list(decoder.generate(prompt, 9, temperature=0.0)), axis=1)
    self.assertEqual(generated.shape, (2, 9))
    full = np.concatenate([prompt, generated], axis=1)
    argmax = np.asarray(jnp.argmax(model(jnp.asarray(full)), axis=-1))
    np.testing.assert_array_equal(generated, argmax[:, 6:-1])

  def test_sampling_is_seeded_and_respects_top_k(self):
    model = make_model(("tnt",))
    decoder = Decoder(model)
    prompt = np.zeros((3, 4), np.int32)
    run = lambda seed, **kw: np.stack(list(decoder.generate(prompt, 6, seed=seed, **kw)), 1)
    np.testing.assert_array_equal(run(0), run(0))
    self.assertFalse(np.array_equal(run(0, temperature=5.0), run(1, temperature=5.0)))
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 11)))
    top2 = np.argsort(np.asarray(logits), axis=-1)[:, -2:]
    for seed in range(20):
      token = np.asarray(sample(logits, jax.random.key(seed), temperature=3.0, top_k=2))
      self.assertTrue(all(token[i] in top2[i] for i in range(4)))
    # top_p below the largest probability keeps only the most likely token
    token = sample(logits, jax.random.key(0), temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(token, jnp.argmax(logits, -1))

  def test_bad_streaming_calls_raise(self):
    model = make_model(("tnt",))
    decoder = Decoder(model)
    cache = decoder.init_cache(1)
    _, cache = decoder.extend(jnp.zeros((1, 3), jnp.int32), cache)
    with self.assertRaisesRegex(ValueError, "position 3.*alignment 8"):
      decoder.extend(jnp.zeros((1, 4), jnp.int32), cache)
    with self.assertRaisesRegex(ValueError, "max_length"):
      Decoder(make_model(("attention",)))
    full = Decoder(make_model(("attention",)), max_length=6)
    with self.assertRaisesRegex(ValueError, "exceeds max_length=6"):
      list(full.generate(np.zeros((1, 4), np.int32), 3))
    with self.assertRaisesRegex(ValueError, "top_p"):
      list(decoder.generate(np.zeros((1, 4), np.int32), 3, top_p=0.0))


if __name__ == "__main__":
  absltest.main()
