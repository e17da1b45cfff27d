"""Evaluation and generation from a checkpoint: exact bits for known logits, and the scripts end
to end on a freshly trained tiny model."""

import math
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np
import pytest
from flax import nnx

from tests.train.test_trainer import tiny_config
from tnt_jax.eval import bits_per_token
from tnt_jax.train import checkpoint as ckpt_lib
from tnt_jax.train.restore_model import load_trained_model
from tnt_jax.train.trainer import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.xdist_group("train")


def _batch(rng, b=2, t=9, vocab=256):
  inputs = rng.integers(0, vocab, (b, t))
  mask = np.ones((b, t), np.float32)
  mask[0, -3:] = 0
  return {"inputs": inputs, "targets": rng.integers(0, vocab, (b, t)), "loss_mask": mask}


class BitsTest(absltest.TestCase):

  def test_uniform_logits_give_exactly_eight_bits_per_byte(self):
    rng = np.random.default_rng(0)
    uniform = lambda x: np.full(x.shape + (256,), 3.7, np.float32)
    bits, count = bits_per_token(uniform, [_batch(rng), _batch(rng)])
    self.assertEqual(count, 2 * (18 - 3))
    self.assertAlmostEqual(bits, 8.0, places=12)

  def test_matches_a_hand_computed_cross_entropy(self):
    rng = np.random.default_rng(1)
    batch = _batch(rng, vocab=5)
    logits = rng.normal(size=(2, 9, 5))
    bits, _ = bits_per_token(lambda x: logits, [batch])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    nll = [-math.log2(p[i, j, batch["targets"][i, j]]) for i in range(2) for j in range(9)
           if batch["loss_mask"][i, j]]
    self.assertAlmostEqual(bits, float(np.mean(nll)), places=10)

  def test_no_scored_tokens_raises(self):
    batch = dict(_batch(np.random.default_rng(2)), loss_mask=np.zeros((2, 9), np.float32))
    with self.assertRaisesRegex(ValueError, "no scored tokens"):
      bits_per_token(lambda x: np.zeros(x.shape + (256,)), [batch])


class FromCheckpointTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    cls.config = tiny_config("mixer=swa+tnt", steps=3, eval_every=3, checkpoint_every=3)
    train_and_evaluate(cls.config, cls.workdir)
    cls.checkpoints = os.path.join(cls.workdir, "checkpoints")

  def test_restored_model_has_the_trained_parameters(self):
    model, config, vocab = load_trained_model(self.checkpoints)
    self.assertEqual(vocab.vocab_size, 256)
    self.assertEqual(config.model.pattern, "swa,tnt")
    saved = ckpt_lib.read_params_tree(self.checkpoints)
    restored = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = lambda tree: {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): x
                         for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    restored, saved = flat(jax.device_get(restored)), flat(saved)
    self.assertEqual(sorted(restored), sorted(saved))
    for name in saved:
      np.testing.assert_array_equal(restored[name], saved[name], err_msg=name)

  def _run(self, module, *args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)

  def test_generate_and_eval_scripts(self):
    gen = self._run("experiments.generate", f"--checkpoint={self.checkpoints}",
                    "--prompt=def f(", "--num_tokens=12", "--temperature=0", "--seed=0")
    self.assertEqual(gen.returncode, 0, gen.stderr[-3000:])
    self.assertTrue(gen.stdout.startswith("def f("), gen.stdout)
    self.assertIn("12 tokens", gen.stderr)
    out_dir = tempfile.mkdtemp()
    ev = self._run("experiments.eval", f"--checkpoints=m={self.checkpoints}",
                   "--lengths=16,64", "--tokens=128", "--batch_size=2",
                   f"--out_dir={out_dir}")
    self.assertEqual(ev.returncode, 0, ev.stderr[-3000:])
    self.assertIn("| m |", ev.stdout)
    for name in ("results.json", "table.md", "length.png"):
      self.assertTrue(os.path.exists(os.path.join(out_dir, name)), name)
    for task, extra in (("needle", ["--depths=0,1"]), ("mqar", [])):
      task_dir = tempfile.mkdtemp()
      run = self._run("experiments.eval", f"--task={task}", f"--checkpoints=m={self.checkpoints}",
                      "--lengths=32,64", "--task_rows=2", f"--out_dir={task_dir}", *extra)
      self.assertEqual(run.returncode, 0, run.stderr[-3000:])
      self.assertTrue(os.path.exists(os.path.join(task_dir, "results.json")), task)
      if task == "needle":
        self.assertTrue(os.path.exists(os.path.join(task_dir, "needle_m.png")))
      else:
        self.assertIn("| m |", run.stdout)
    bad = self._run("experiments.generate", f"--checkpoint={self.workdir}/nothing_here")
    self.assertNotEqual(bad.returncode, 0)
    self.assertIn("does not exist", bad.stderr)


if __name__ == "__main__":
  absltest.main()
