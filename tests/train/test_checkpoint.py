"""Checkpointer: bit-exact round trips, retention, atomicity, clear errors, SIGTERM as a flag."""

import os
import shutil
import signal
import tempfile

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tnt_jax.train import checkpoint as ckpt_lib
from tnt_jax.train.checkpoint import Checkpointer, read_metadata, restore_subtree
from tnt_jax.train.preemption import install_sigterm_handler


class _TinyLM(nnx.Module):
  """Enough structure to matter: a list of layers gives int keys in the pure dict."""

  def __init__(self, rngs, width=6):
    self.embed = nnx.Embed(11, width, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(2)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)


def _train_state(seed=0, width=6):
  """{"params", "opt_state", "step"} after one adamw update, so mu and nu are non-zero."""
  params = nnx.to_pure_dict(nnx.state(_TinyLM(nnx.Rngs(seed), width)))
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(seed + 1), p.shape), params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return {"params": params, "opt_state": opt_state, "step": jnp.asarray(7, jnp.int32)}


DATA_STATE = {"next_index": 1234, "epoch": 2, "shard": "train-00003", "rng": [5, 9]}
METADATA = {"config": {"model": "tnt", "width": 6, "lr": 1e-2}, "param_count": 321}


class CheckpointTest(absltest.TestCase):

  def _tempdir(self) -> str:
    # Not self.create_tempdir(): that needs absl flags parsed, which pytest does not do.
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    return tmp.name

  def setUp(self):
    super().setUp()
    self.dir = self._tempdir() + "/checkpoints"
    self.state = _train_state()
    self.abstract = jax.eval_shape(lambda: self.state)

  def _saved(self, steps=(10,), **kwargs):
    """A closed Checkpointer's directory holding `steps`."""
    with Checkpointer(self.dir, keep=kwargs.pop("keep", 5), save_every=1) as ckpt:
      for step in steps:
        self.assertTrue(ckpt.save(step, self.state, DATA_STATE, METADATA))
    return self.dir

  def assertTreesEqual(self, got, want):
    self.assertEqual(jax.tree.structure(got), jax.tree.structure(want))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      self.assertIsInstance(g, jax.Array)
      self.assertEqual(g.dtype, w.dtype)
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

  def test_round_trip_is_bit_exact(self):
    self._saved()
    with Checkpointer(self.dir, keep=5, save_every=1) as ckpt:
      self.assertEqual(ckpt.latest_step(), 10)
      state, data_state, metadata = ckpt.restore(10, self.abstract)
    self.assertTreesEqual(state, self.state)   # optax namedtuples come back as namedtuples
    self.assertIsInstance(state["opt_state"][0], optax.ScaleByAdamState)
    self.assertGreater(float(jnp.abs(state["opt_state"][0].nu["layers"][1]["kernel"]).max()), 0)
    self.assertEqual(data_state, DATA_STATE)
    self.assertEqual(metadata, METADATA)

  def test_restore_without_data_state_or_metadata(self):
    with Checkpointer(self.dir, keep=2, save_every=1) as ckpt:
      ckpt.save(3, self.state, None)
      ckpt.wait()
      _, data_state, metadata = ckpt.restore(None, self.abstract)
    self.assertIsNone(data_state)
    self.assertEqual(metadata, {})

  def test_restore_keeps_the_abstract_sharding(self):
    self._saved()
    mesh = jax.make_mesh((1,), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            self.abstract)
    with Checkpointer(self.dir, keep=5, save_every=1) as ckpt:
      state, _, _ = ckpt.restore(10, abstract)
    for leaf in jax.tree.leaves(state):
      self.assertEqual(leaf.sharding, replicated)

  def test_keep_deletes_older_steps(self):
    self._saved(steps=(1, 2, 3, 4), keep=2)
    self.assertEqual(sorted(os.listdir(self.dir)), ["3", "4"])
    with Checkpointer(self.dir, keep=2, save_every=1) as ckpt:
      self.assertEqual(ckpt.all_steps(), [3, 4])
      self.assertEqual(ckpt.latest_step(), 4)

  def test_save_every_and_force(self):
    with Checkpointer(self.dir, keep=5, save_every=5) as ckpt:
      self.assertFalse(ckpt.save(3, self.state, DATA_STATE))
      self.assertTrue(ckpt.save(5, self.state, DATA_STATE))
      self.assertTrue(ckpt.save(7, self.state, DATA_STATE, force=True))
      # A preemption save on a step just saved periodically (maybe still in flight) is a no-op.
      self.assertFalse(ckpt.save(7, self.state, DATA_STATE, force=True))
      ckpt.wait()
      self.assertEqual(ckpt.all_steps(), [5, 7])

  def test_half_written_checkpoints_are_ignored(self):
    self._saved(steps=(2,))
    # A save killed before its rename: orbax's tmp name, items written, no commit marker.
    tmp = os.path.join(self.dir, "3.orbax-checkpoint-tmp-1700000000")
    shutil.copytree(os.path.join(self.dir, "2"), tmp)
    os.remove(os.path.join(tmp, ckpt_lib.COMMIT_FILE))
    # A final-named step without the marker (a copy cut short), and one with the marker but
    # without its state item.
    shutil.copytree(os.path.join(self.dir, "2"), os.path.join(self.dir, "4"))
    os.remove(os.path.join(self.dir, "4", ckpt_lib.COMMIT_FILE))
    shutil.copytree(os.path.join(self.dir, "2"), os.path.join(self.dir, "5"))
    shutil.rmtree(os.path.join(self.dir, "5", "state"))

    # Readers (init_from) see step 2 only, and leave the directory alone.
    self.assertEqual(ckpt_lib.complete_steps(self.dir), [2])
    self.assertTreesEqual(restore_subtree(self.dir, self.abstract["params"]),
                          self.state["params"])
    with self.assertRaisesRegex(ValueError, "not a complete checkpoint"):
      restore_subtree(os.path.join(self.dir, "4"), self.abstract["params"])
    with self.assertRaisesRegex(ValueError, "unfinished save"):
      read_metadata(tmp)
    self.assertTrue(os.path.exists(tmp))

    with Checkpointer(self.dir, keep=5, save_every=1) as ckpt:
      self.assertEqual(ckpt.latest_step(), 2)
      for step in (3, 4, 5):
        with self.assertRaisesRegex(ValueError, f"step={step} is not a complete checkpoint"):
          ckpt.restore(step, self.abstract)
      state, _, _ = ckpt.restore(None, self.abstract)
      self.assertTreesEqual(state, self.state)
      # Reaching step 4 again replaces the incomplete directory with a complete save.
      self.assertTrue(ckpt.save(4, self.state, DATA_STATE, METADATA))
      ckpt.wait()
      self.assertEqual(ckpt.latest_step(), 4)
      self.assertEqual(ckpt.restore(4, self.abstract)[2], METADATA)
    # The writer clears leftover tmp directories (in the background; a save waits for it).
    self.assertFalse(os.path.exists(tmp))

  def test_shape_mismatch_names_key_path_and_shapes(self):
    self._saved()
    wider = jax.eval_shape(lambda: _train_state(width=8))
    with Checkpointer(self.dir, keep=5, save_every=1) as ckpt:
      # Leaves are visited in sorted-key order, so the first mismatch is in opt_state.
      first = r"'opt_state/0/mu/embed/embedding'.*\(11, 6\).*\(11, 8\)"
      with self.assertRaisesRegex(ValueError, first):
        ckpt.restore(10, wider)
      fewer = dict(self.abstract, params=dict(self.abstract["params"]))
      del fewer["params"]["norm"]
      with self.assertRaisesRegex(ValueError, "'params/norm/bias'.*abstract tree lacks"):
        ckpt.restore(10, fewer)
    with self.assertRaisesRegex(ValueError, r"'params/embed/embedding'.*\(11, 6\).*\(11, 8\)"):
      restore_subtree(self.dir, wider["params"])
    with self.assertRaisesRegex(ValueError, "no subtree 'model'"):
      restore_subtree(self.dir, wider["params"], subtree="model")

  def test_init_from(self):
    self._saved(steps=(4, 9))
    for path in (self.dir, os.path.join(self.dir, "4")):
      params = restore_subtree(path, jax.eval_shape(lambda: self.state["params"]))
      self.assertTreesEqual(params, self.state["params"])
      self.assertEqual(read_metadata(path), METADATA)
    with self.assertRaisesRegex(ValueError, "does not exist"):
      restore_subtree(self.dir + "/nope", self.abstract["params"])
    empty = self._tempdir()
    with self.assertRaisesRegex(ValueError, "holds no complete checkpoint"):
      restore_subtree(empty, self.abstract["params"])

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "keep=0 must be >= 1"):
      Checkpointer(self.dir, keep=0, save_every=1)
    with Checkpointer(self.dir, keep=1, save_every=1) as ckpt:
      with self.assertRaisesRegex(ValueError, "metadata must be JSON-serialisable"):
        ckpt.save(1, self.state, {}, {"dtype": jnp.float32})
      with self.assertRaisesRegex(ValueError, "holds no complete checkpoint"):
        ckpt.restore(None, self.abstract)


class PreemptionTest(absltest.TestCase):

  def test_sigterm_sets_the_flag_and_close_restores_the_handler(self):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
      preempt = install_sigterm_handler()
      self.assertFalse(preempt.should_stop(0))
      os.kill(os.getpid(), signal.SIGTERM)   # the process survives: only a flag is set
      self.assertTrue(preempt.requested)
      self.assertTrue(preempt.should_stop(1))
      self.assertEqual(seen, [])
      preempt.close()
      os.kill(os.getpid(), signal.SIGTERM)
      self.assertEqual(seen, [signal.SIGTERM])
    finally:
      signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
  absltest.main()
