"""The LM's block loop: scanning over block groups (scan_layers) computes exactly what the
unrolled loop does — loss and every parameter gradient, with and without block remat, with a
pattern of period 2 and a remainder block outside the scan."""

from unittest import mock

from absl.testing import absltest, parameterized
import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.helpers import assert_trees_rel_close
from tnt_jax.kernels import chunk_memory
from tnt_jax.models import LanguageModel, LMConfig
from tnt_jax.ops import tnt as tnt_module
from tnt_jax.ops.api import memory_op
from tnt_jax.train.step import ModelFunctions, token_losses


class ScanLayersTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("tnt_3_blocks", ("tnt",), 3, False),
      ("swa_tnt_5_blocks_remat", ("swa", "tnt"), 5, True),
  )
  def test_scanned_blocks_equal_unrolled(self, pattern, num_layers, remat):
    base = LMConfig(vocab_size=13, d_model=16, num_layers=num_layers, num_heads=2,
                    pattern=pattern, window=6, dtype="float32", remat=remat,
                    mixer_options={"tnt": dict(global_chunk=8, local_chunks=(2,),
                                               shard_lengths=8)})
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 13, (2, 32)), jnp.int32)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
             "loss_mask": jnp.ones((2, 32))}
    results = []
    for scan in (True, False):
      model = ModelFunctions(LanguageModel(dataclasses.replace(base, scan_layers=scan),
                                           rngs=nnx.Rngs(0)))
      loss = lambda params: token_losses(model, params, batch)[0]
      results.append(jax.jit(jax.value_and_grad(loss))(model.initial_params()))
    (loss_scan, grad_scan), (loss_unrolled, grad_unrolled) = results
    assert_trees_rel_close(self, loss_scan, loss_unrolled, 1e-6, "loss")
    assert_trees_rel_close(self, grad_scan, grad_unrolled, 1e-6, "grad")


class SavedStatesShareTest(parameterized.TestCase):
  """Without block remat every block's memory-kernel residuals live at once in the backward
  pass, so the LM traces its blocks with the kernels' saved-state budget split between them."""

  @parameterized.parameters((False, 3), (True, 1))
  def test_blocks_traced_with_the_budget_split(self, remat, want):
    config = LMConfig(vocab_size=13, d_model=16, num_layers=3, num_heads=2, pattern=("tnt",),
                      dtype="float32", remat=remat,
                      mixer_options={"tnt": dict(global_chunk=8, local_chunks=(2,),
                                                 shard_lengths=8)})
    model = ModelFunctions(LanguageModel(config, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((1, 16), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens, "loss_mask": jnp.ones((1, 16))}
    seen = []

    def spy(*args, **kwargs):
      seen.append(chunk_memory._SAVED_STATES_SHARERS.get())
      return memory_op(*args, **kwargs)

    with mock.patch.object(tnt_module, "memory_op", spy):
      jax.eval_shape(jax.grad(lambda p: token_losses(model, p, batch)[0]),
                     model.initial_params())
    self.assertNotEmpty(seen)
    self.assertEqual(set(seen), {want})
    self.assertEqual(chunk_memory._SAVED_STATES_SHARERS.get(), 1)   # restored after


class EmbeddingLookupTest(parameterized.TestCase):

  def _loss_and_grads(self, lookup, dtype):
    config = LMConfig(vocab_size=37, d_model=16, num_layers=1, num_heads=2, pattern=("swa",),
                      window=8, dtype=dtype, embedding_lookup=lookup)
    model = ModelFunctions(LanguageModel(config, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 37, (2, 24)), jnp.int32)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
             "loss_mask": jnp.ones((2, 24))}
    loss = lambda params: token_losses(model, params, batch)[0]
    return jax.jit(jax.value_and_grad(loss))(model.initial_params())

  @parameterized.parameters(("float64", 1e-12), ("float32", 1e-6), ("bfloat16", 2e-2))
  def test_one_hot_lookup_equals_take(self, dtype, tol):
    """The same model, loss and gradients (the embedding table's included) either way; the
    forward is exact, the gradient sums in another order (bf16: the scatter-add rounds each
    add, the matmul once)."""
    if dtype == "float64":
      jax.config.update("jax_enable_x64", True)
      self.addCleanup(jax.config.update, "jax_enable_x64", False)
    (loss_take, grad_take), (loss_hot, grad_hot) = (self._loss_and_grads(lookup, dtype)
                                                    for lookup in ("take", "one_hot"))
    if dtype != "bfloat16":
      self.assertEqual(float(loss_take), float(loss_hot))
    assert_trees_rel_close(self, loss_hot, loss_take, tol, "loss")
    assert_trees_rel_close(self, grad_hot, grad_take, tol, "grad")
    table = grad_take["embed"]["embedding"]
    self.assertGreater(float(jnp.abs(table).max()), 0)

  def test_auto_rule_and_bad_value(self):
    make = lambda **kw: LMConfig(**{**dict(d_model=96, num_layers=1, num_heads=2,
                                           pattern=("swa",)), **kw})
    self.assertEqual(make(vocab_size=256).mlp_hidden, 256)
    self.assertTrue(make(vocab_size=256).one_hot_embedding)          # bytes: <= mlp_hidden
    self.assertFalse(make(vocab_size=257).one_hot_embedding)
    self.assertFalse(make(vocab_size=256, embedding_lookup="take").one_hot_embedding)
    self.assertTrue(make(vocab_size=50_000, embedding_lookup="one_hot").one_hot_embedding)
    with self.assertRaisesRegex(ValueError, r"embedding_lookup='gather' must be one of "):
      make(vocab_size=256, embedding_lookup="gather")


class FlopsTest(absltest.TestCase):

  def test_hand_counts_plain_and_ttt_e2e(self):
    from tnt_jax.models.flops import lm_train_flops
    # d 16, 2 heads x 8, SwiGLU hidden 64, vocab 11, window 6, one sequence of 12 tokens.
    config = LMConfig(vocab_size=11, d_model=16, num_layers=2, num_heads=2, pattern=("swa",),
                      window=6)
    mlp = 2 * 12 * 3 * 16 * 64                            # 73,728
    attention = 2 * 12 * 5 * 16 * 16 + 4 * 12 * 6 * 16    # projections + scores and values
    head = 2 * 12 * 16 * 11
    self.assertEqual(lm_train_flops(config, 1, 12), 3 * (head + 2 * (mlp + attention)))
    # TTT-E2E with the last block mutable: its twin MLP doubles that block's MLP, and the
    # inner gradient is a backward (2x) from the loss through the head and that block.
    e2e = dataclasses.replace(config, ttt_e2e=dict(mini_batch=4, mutable_fraction=0.5))
    forward = head + (attention + mlp) + (attention + 2 * mlp)
    top = head + attention + 2 * mlp
    self.assertEqual(lm_train_flops(e2e, 1, 12), 3 * (forward + 2 * top))


if __name__ == "__main__":
  absltest.main()
