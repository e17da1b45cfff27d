"""The eval step's sums against a direct numpy computation from the model's logits."""

from absl.testing import absltest
import jax
import numpy as np
from flax import nnx

from tnt_jax.models import LMConfig, LanguageModel
from tnt_jax.train.step import ModelFunctions, make_eval_step


class EvalStepTest(absltest.TestCase):

  def test_loss_count_and_correct_match_numpy(self):
    config = LMConfig(vocab_size=7, d_model=16, num_layers=1, num_heads=2, pattern=("swa",),
                      window=4, dtype="float32")
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 7, (3, 10)).astype(np.int32)
    logits = np.asarray(model(inputs), np.float64)
    # Targets: the model's own argmax where i is even (correct), something else where odd.
    argmax = logits.argmax(-1)
    targets = np.where(np.arange(10) % 2 == 0, argmax, (argmax + 1) % 7).astype(np.int32)
    mask = np.ones((3, 10), np.float32)
    mask[2, 5:] = 0
    functions = ModelFunctions(model)
    loss_sum, count, correct = jax.jit(make_eval_step(functions))(
        functions.initial_params(), {"inputs": inputs, "targets": targets, "loss_mask": mask})
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    self.assertAlmostEqual(float(loss_sum), float((nll * mask).sum()), places=3)
    self.assertEqual(float(count), 25.0)
    self.assertEqual(float(correct), float(((targets == argmax) * mask).sum()))
    self.assertEqual(float(correct), 13.0)   # even positions: 5 + 5 + 3


if __name__ == "__main__":
  absltest.main()
