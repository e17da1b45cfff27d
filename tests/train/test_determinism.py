"""config.deterministic: the XLA flags are set before the backend starts (by experiments/train.py),
XLA accepts them, and a run that asks for determinism too late is refused."""

import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax

from tnt_jax.train import determinism

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


class DeterminismTest(absltest.TestCase):

  def test_missing_flags_are_read_from_xla_flags(self):
    self.assertEqual(determinism.missing_flags({}), list(determinism.DETERMINISTIC_XLA_FLAGS))
    environ = {"XLA_FLAGS": "--xla_foo=1 " + " ".join(determinism.DETERMINISTIC_XLA_FLAGS)}
    self.assertEqual(determinism.missing_flags(environ), [])

  def test_setting_flags_after_the_backend_started_is_an_error(self):
    jax.devices()
    environ = {"XLA_FLAGS": "--xla_foo=1"}
    with self.assertRaisesRegex(RuntimeError, r"has started already"):
      determinism.set_xla_flags(environ)
    self.assertEqual(environ, {"XLA_FLAGS": "--xla_foo=1"})          # left as it was
    done = {"XLA_FLAGS": " ".join(determinism.DETERMINISTIC_XLA_FLAGS)}
    determinism.set_xla_flags(done)                                   # nothing to add: fine
    determinism.check(True, done)
    determinism.check(False, environ)                                 # not asked for

  def test_train_entry_point_sets_the_flags_before_the_backend_starts(self):
    """The command line a user runs: the trainer refuses a deterministic run whose flags are
    not in effect, so finishing proves experiments/train.py set them in time (and XLA took
    them)."""
    workdir = tempfile.mkdtemp()
    overrides = dict(deterministic=True, steps=2, log_every=1, eval_batches=1,
                     **{"data.seq_len": 32, "data.batch_size": 4, "data.max_bytes": 300_000,
                        "data.validation_fraction": 0.2,
                        "model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2,
                        "model.mixer_options.tnt.global_chunk": 16,
                        "model.mixer_options.tnt.shard_lengths": 16})
    command = [sys.executable, "-m", "experiments.train", "--workdir", workdir,
               "--config", "configs/tnt_lm.py:size=tiny"]
    command += [f"--config.{key}={value}" for key, value in overrides.items()]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    self.assertEqual(done.returncode, 0, done.stderr[-3000:])
    self.assertIn("done: step 2", done.stdout + done.stderr)

if __name__ == "__main__":
  absltest.main()
