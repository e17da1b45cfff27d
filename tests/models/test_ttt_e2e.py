"""TTT-E2E (tnt_jax/models/ttt_e2e.py), float64 on tiny models: exact causality by gradient
(no later input, no other row, and earlier mini-batches reach the output through the inner
steps); the forward equals a hand-written loop of plain forwards and hand-written clipped SGD
steps; the meta-gradient (second order, through the inner steps) matches finite differences;
parallel == prefill + token-by-token decoding across mini-batch boundaries; remat changes
nothing; config rules."""

import math
from unittest import mock

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import ttt_e2e as ttt_e2e_configs
from tests.helpers import (assert_trees_rel_close, extend_in_pieces, prefill_step_extend_step,
                           rel_err)
from tnt_jax.models import LanguageModel, LMConfig
from tnt_jax.models import ttt_e2e
from tnt_jax.models.decoding import Decoder
from tnt_jax.models.ttt_e2e import TTTE2EConfig
from tnt_jax.train.step import ModelFunctions, token_losses
from tnt_jax.train.trainer import check_model_context_split, lm_config

V, M = 17, 4


def make_model(*, num_layers=4, pattern=("swa",), window=6, seed=0, **ttt):
  """A float64 model (parameters too) with every parameter perturbed, the mutable MLPs' zero
  output projections included, so that no term of the check is trivially zero."""
  ttt = dict(dict(mini_batch=M, inner_lr=0.5, clip_norm=1.0), **ttt)
  config = LMConfig(vocab_size=V, d_model=16, num_layers=num_layers, num_heads=2,
                    pattern=pattern, window=window, dtype="float64", ttt_e2e=ttt)
  graphdef, state = nnx.split(LanguageModel(config, rngs=nnx.Rngs(seed)))
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [x.astype(jnp.float64) + 0.2 * jax.random.normal(k, x.shape, jnp.float64)
            for k, x in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def tokens(batch, length, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, V, jnp.int32)


def plain_logits(model, tokens_BxT):
  """The blocks' own parallel forward (nnx.Linear MLPs, dot_product_attention), no TTT."""
  x = model.embed(tokens_BxT)
  for block in model.blocks:
    x = block(x)
  return model.embed.attend(model.final_norm(x)) / math.sqrt(model.config.d_model)


def hand_written_ttt(model, ids_BxT, steps):
  """Mini-batch by mini-batch, row by row, written out: logits of mini-batch i from the plain
  forward with the weights after i steps (the forward is causal, so run over the whole row and
  sliced); each of the first `steps` mini-batches then takes one SGD step on the mean
  next-token loss of its M - 1 in-mini-batch pairs, the gradient clipped by its global norm.
  Returns, per row: (logits [T, V], model with the stepped weights, the gradient norms)."""
  c = model.config.ttt_e2e
  graphdef, mutable0, rest = nnx.split(model, nnx.PathContains("mutable_mlp"), ...)
  logits_fn = jax.jit(lambda mutable, ids_1xT: plain_logits(nnx.merge(graphdef, mutable, rest),
                                                            ids_1xT)[0])

  @jax.jit
  def grad_fn(mutable, ids_1xT, lo):
    def loss(mutable):
      logits = jax.lax.dynamic_slice_in_dim(logits_fn(mutable, ids_1xT), lo, M - 1)
      targets = jax.lax.dynamic_slice_in_dim(ids_1xT[0], lo + 1, M - 1)
      logp = jax.nn.log_softmax(logits, axis=-1)
      return -jnp.mean(logp[jnp.arange(M - 1), targets])
    return jax.grad(loss)(mutable)

  rows = []
  for row in range(ids_BxT.shape[0]):
    ids, mutable, logits, norms = ids_BxT[row:row + 1], mutable0, [], []
    for i, lo in enumerate(range(0, ids.shape[1], M)):
      logits.append(logits_fn(mutable, ids)[lo:lo + M])
      if i < steps:
        grad = grad_fn(mutable, ids, lo)
        norm = math.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grad)))
        scale = min(1.0, c.clip_norm / norm)
        mutable = jax.tree.map(lambda w, g: w - c.inner_lr * scale * g, mutable, grad)
        norms.append(norm)
    rows.append((jnp.concatenate(logits), nnx.merge(graphdef, mutable, rest), norms))
  return rows


def mutable_kernels(model):
  """The model's mutable MLP kernels in the layout of the cache's weights (without rows)."""
  return [{part: getattr(block.mutable_mlp, part).kernel[...] for part in ("gate", "up", "down")}
          for block in model.blocks if hasattr(block, "mutable_mlp")]


class TTTE2ETest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    jax.config.update("jax_enable_x64", True)
    self.addCleanup(jax.config.update, "jax_enable_x64", False)

  def test_output_at_t_has_zero_gradient_from_later_inputs_and_other_rows(self):
    # window 2 over 2 blocks: attention reaches 2 tokens back; anything earlier reaches the
    # output only through the inner steps of the mini-batches before it.
    ids = tokens(2, 14)
    reach = 2
    for lr in (0.5, 0.0):
      model = make_model(num_layers=2, window=2, inner_lr=lr)
      x = model.embed(ids)
      cot = jax.random.normal(jax.random.key(5), (V,))
      grad_at = jax.jit(lambda x, t: jax.grad(
          lambda x: jnp.dot(model.ttt_forward(x, ids)[0, t], cot))(x))
      for t in (2, 5, 8, 13):
        grad = np.asarray(grad_at(x, t))
        np.testing.assert_array_equal(grad[0, t + 1:], 0.0, err_msg=f"later inputs, {t=}")
        np.testing.assert_array_equal(grad[1], 0.0, err_msg=f"the other row, {t=}")
        per_position = np.abs(grad[0, :t + 1]).max(axis=-1)
        if lr:   # every earlier token reaches t: by attention, or through the inner steps
          self.assertTrue(np.all(per_position > 0), f"{t=}: {per_position}")
        else:    # no inner step: nothing beyond attention's reach
          np.testing.assert_array_equal(per_position[:max(0, t - reach)], 0.0)
          self.assertTrue(np.all(per_position[t - min(t, reach):] > 0))

  def test_later_tokens_do_not_change_earlier_logits(self):
    # Tokens are also the inner loss's targets: change every token after position 7 (the end
    # of mini-batch 1) and all of row 1; row 0's logits up to 7 are bit-identical.
    model = make_model()
    ids = tokens(2, 14)
    other = ids.at[:, 8:].set((ids[:, 8:] + 1) % V).at[1].set((ids[1] + 3) % V)
    forward = jax.jit(model)
    np.testing.assert_array_equal(forward(ids)[0, :8], forward(other)[0, :8])
    self.assertGreater(float(jnp.abs(forward(ids)[0, 8:] - forward(other)[0, 8:]).max()), 0.0)

  def test_forward_equals_plain_forwards_with_hand_written_sgd_steps(self):
    # One mutable block, the last: no key depends on the mutable weights, so mini-batch i's
    # logits are the plain parallel forward over tokens [0, (i + 1) M) with the weights after
    # i hand-written steps. clip_norm lies among the gradient norms: both branches are taken.
    model = make_model(clip_norm=1.5)
    self.assertEqual(model.config.ttt_e2e.num_mutable(4), 1)
    ids = tokens(2, 3 * M + 2)
    got = jax.jit(model)(ids)
    _, cache = jax.jit(model.extend)(ids[:, :3 * M], model.init_cache(2))
    all_norms = []
    for row, (want, stepped, norms) in enumerate(hand_written_ttt(model, ids, steps=3)):
      assert_trees_rel_close(self, got[row], want, 1e-6, f"row {row} logits")
      weights = jax.tree.map(lambda w: w[row], cache["ttt"]["weights"])
      assert_trees_rel_close(self, weights, mutable_kernels(stepped), 1e-6, f"row {row} W_3")
      all_norms += norms
    clip = model.config.ttt_e2e.clip_norm
    self.assertTrue(min(all_norms) < clip < max(all_norms), all_norms)

  def test_meta_gradient_matches_finite_differences(self):
    # Outer loss through two inner steps and a partial tail; clipping active (its norm is
    # differentiated too). Directions: everything, W_0 only, the frozen parameters only.
    model = ModelFunctions(make_model(num_layers=2, clip_norm=0.05, inner_lr=1.0))
    params = model.initial_params()
    ids = tokens(2, 2 * M + 3, seed=4)
    batch = {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1),
             "loss_mask": jnp.ones(ids.shape).at[:, -1].set(0.0)}
    outer_loss = lambda p: (lambda total, count: total / count)(*token_losses(model, p, batch))
    loss = jax.jit(outer_loss)
    grad = jax.jit(jax.grad(outer_loss))(params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    is_mutable = [("mutable_mlp" in jax.tree_util.keystr(path)) for path, _ in flat]
    keys = jax.random.split(jax.random.key(7), len(flat))
    noise = [jax.random.normal(k, x.shape, x.dtype) for k, (_, x) in zip(keys, flat)]
    eps = 1e-6
    for name, keep in (("all", lambda m: True), ("W_0", lambda m: m),
                       ("frozen", lambda m: not m)):
      d = jax.tree.unflatten(treedef, [n if keep(m) else jnp.zeros_like(n)
                                       for n, m in zip(noise, is_mutable)])
      shifted = lambda s: jax.tree.map(lambda p, v: p + s * eps * v, params, d)
      fd = (float(loss(shifted(1.0))) - float(loss(shifted(-1.0)))) / (2 * eps)
      analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(grad),
                                                            jax.tree.leaves(d)))
      self.assertGreater(abs(fd), 1e-3, name)
      self.assertLess(abs(analytic - fd) / abs(fd), 1e-6, f"{name}: {analytic} vs {fd}")
      if name == "all":
        # The check sees the second-order term: without it (inner gradients held constant
        # in the outer backward) the meta-gradient is off by far more than the tolerance.
        step = ttt_e2e.sgd_step
        with mock.patch.object(ttt_e2e, "sgd_step",
                               lambda w, g, c: step(w, jax.lax.stop_gradient(g), c)):
          first_order = jax.jit(jax.grad(outer_loss))(params)
        approx = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(first_order),
                                                          jax.tree.leaves(d)))
        self.assertGreater(abs(approx - fd) / abs(fd), 1e-3)

  def test_remat_does_not_change_the_meta_gradient(self):
    ids = tokens(2, 2 * M + 3, seed=6)
    batch = {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1), "loss_mask": jnp.ones(ids.shape)}
    grads = []
    for remat in (True, False):
      model = ModelFunctions(make_model(num_layers=1, remat=remat))
      loss = lambda p: token_losses(model, p, batch)[0]
      grads.append(jax.jit(jax.grad(loss))(model.initial_params()))
    assert_trees_rel_close(self, grads[0], grads[1], 1e-6, "remat vs not")

  def test_parallel_equals_prefill_and_token_by_token_decoding(self):
    # Two mutable blocks (keys of the last block then depend on the mutable weights), SWA and
    # full attention. An unaligned prefill ending inside mini-batch 1, single tokens that
    # complete it (the step taken at its last token), an aligned 2-mini-batch extend, single
    # tokens across one more boundary.
    model = make_model(pattern=("swa", "attention"), mutable_fraction=0.5)
    length = 21
    ids = tokens(2, length, seed=2)
    want = jax.jit(model)(ids)
    decoder = Decoder(model, max_length=length)
    self.assertEqual(decoder.alignment, M)
    got, cache = extend_in_pieces(decoder, ids, decoder.init_cache(2),
                                  prefill_step_extend_step(6, (8, 16), length))
    self.assertEqual(int(cache["position"]), length)
    assert_trees_rel_close(self, got, want, 1e-6, "decoded logits")
    # the weights moved: a decoder that never stepped would not match
    self.assertGreater(rel_err(cache["ttt"]["weights"][0]["down"][0],
                               mutable_kernels(model)[0]["down"]), 1e-3)

  def test_mutable_mlps_are_the_last_quarter_and_start_as_no_ops(self):
    config = LMConfig(vocab_size=V, d_model=16, num_layers=6, num_heads=2, pattern=("swa",),
                      dtype="float32", ttt_e2e=dict(mini_batch=M))
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    self.assertEqual([hasattr(b, "mutable_mlp") for b in model.blocks], [False] * 4 + [True] * 2)
    for block in model.blocks[4:]:
      np.testing.assert_array_equal(block.mutable_mlp.down.kernel[...], 0.0)
      self.assertGreater(float(jnp.abs(block.mutable_mlp.gate.kernel[...]).max()), 0.0)


class TTTE2EConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("mini_batch", dict(mini_batch=1), "mini_batch=1 must be an integer >= 2"),
      ("mini_batch_float", dict(mini_batch=4.0), "mini_batch=4.0 must be an integer"),
      ("inner_lr", dict(inner_lr=-0.1), "inner_lr=-0.1 must be a finite number >= 0"),
      ("inner_lr_nan", dict(inner_lr=float("nan")), "inner_lr=nan must be a finite"),
      ("clip_norm", dict(clip_norm=0.0), "clip_norm=0.0 must be a number > 0"),
      ("fraction_zero", dict(mutable_fraction=0.0), r"mutable_fraction=0.0 must be in \(0, 1\]"),
      ("fraction_big", dict(mutable_fraction=1.5), r"mutable_fraction=1.5 must be in \(0, 1\]"),
      ("remat", dict(remat="yes"), "remat='yes' must be True or False"),
  )
  def test_bad_fields_raise(self, fields, message):
    with self.assertRaisesRegex(ValueError, message):
      TTTE2EConfig(**fields)
    with self.assertRaisesRegex(ValueError, message):   # as a dict through LMConfig
      LMConfig(vocab_size=V, d_model=16, num_layers=4, num_heads=2, pattern=("swa",),
               ttt_e2e=fields)

  def test_model_rules(self):
    common = dict(vocab_size=V, d_model=16, num_layers=4, num_heads=2)
    with self.assertRaisesRegex(ValueError, r"unknown fields \['lr'\]"):
      LMConfig(**common, pattern=("swa",), ttt_e2e=dict(lr=0.1))
    with self.assertRaisesRegex(ValueError, r"needs attention mixers.*has \['tnt'\]"):
      LMConfig(**common, pattern=("swa", "tnt"), ttt_e2e={})
    with self.assertRaisesRegex(ValueError, "remat=False"):
      LMConfig(**common, pattern=("swa",), remat=True, ttt_e2e={})
    config = LMConfig(**common, pattern=("swa", "attention"), ttt_e2e=dict(mini_batch=8))
    self.assertEqual(config.ttt_e2e, TTTE2EConfig(mini_batch=8))
    self.assertEqual([config.ttt_e2e.num_mutable(n) for n in (1, 4, 5, 12, 30)],
                     [1, 1, 2, 3, 8])
    self.assertEqual(TTTE2EConfig(mutable_fraction=0.1).num_mutable(30), 3)
    with self.assertRaisesRegex(ValueError, "TTT-E2E.*mesh.context=2"):
      check_model_context_split(64, 2, config)
    check_model_context_split(64, 1, config)   # one device: fine

  def test_config_file_builds_each_size(self):
    for size in ttt_e2e_configs.TTT_SIZES:
      c = ttt_e2e_configs.get_config(f"size={size}")
      model_config = lm_config(c, vocab_size=256)
      self.assertEqual(set(model_config.pattern), {"swa"})
      self.assertEqual(model_config.window, ttt_e2e_configs.TTT_SIZES[size]["window"])
      self.assertEqual(model_config.ttt_e2e.mini_batch,
                       ttt_e2e_configs.TTT_SIZES[size]["mini_batch"])
      self.assertEqual(c.data.seq_len % model_config.ttt_e2e.mini_batch, 0)
      self.assertFalse(model_config.remat)
    c = ttt_e2e_configs.get_config("size=tiny,mini_batch=16,window=8,inner_lr=0.25")
    self.assertEqual((c.model.ttt_e2e.mini_batch, c.model.window, c.model.ttt_e2e.inner_lr),
                     (16, 8, 0.25))
    with self.assertRaisesRegex(ValueError, "unknown config arguments.*mixer"):
      ttt_e2e_configs.get_config("mixer=tnt")
    with self.assertRaisesRegex(ValueError, "mini_batch=1 must be"):
      ttt_e2e_configs.get_config("mini_batch=1")
    with self.assertRaisesRegex(ValueError, "size='huge' is unknown"):
      ttt_e2e_configs.get_config("size=huge")


if __name__ == "__main__":
  absltest.main()
