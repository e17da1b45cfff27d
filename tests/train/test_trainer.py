"""End to end: a tiny TNT LM trains, resumes bit-exactly after SIGTERM, stage 2 freezes what it
should, and bad inputs fail with clear errors. Runs on the simulated CPU devices (tests/conftest)."""

import json
import os
import tempfile

from absl import flags
from absl.testing import absltest
import jax
import numpy as np
import pytest
from ml_collections import config_flags

from configs.tnt_lm import get_config
from tnt_jax.parallel import mesh as mesh_lib
from tnt_jax.train import checkpoint as ckpt_lib
from tnt_jax.train.optimizer import is_local_memory_param
from tnt_jax.train.trainer import lm_config, runs_kernels, train_and_evaluate

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tnt_lm.py")
pytestmark = pytest.mark.xdist_group("train")   # one worker runs these: the class shares runs


def tiny_config(arg="", **overrides):
  c = get_config("size=tiny" + ("," + arg if arg else ""))
  c.steps, c.log_every, c.eval_every, c.eval_batches = 6, 1, 4, 2
  c.checkpoint_every, c.keep_checkpoints = 3, 3
  c.data.seq_len, c.data.batch_size, c.data.max_bytes = 32, 4, 300_000
  c.data.validation_fraction = 0.2
  c.model.d_model, c.model.num_layers, c.model.num_heads = 32, 1, 2
  for kind, options in c.model.mixer_options.items():
    if kind == "tnt":
      options.update(global_chunk=16, shard_lengths=16)
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def train_losses(workdir):
  losses = {}
  with open(os.path.join(workdir, "logs", "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "train_loss" in row:
        losses[row["step"]] = row["train_loss"]
  return losses


class TrainerTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.full_dir = os.path.join(cls.root, "full")
    cls.full = train_and_evaluate(tiny_config(), cls.full_dir)

  def test_end_to_end_outputs(self):
    self.assertTrue(np.isfinite(self.full["eval_loss"]))
    self.assertEqual(self.full["step"], 6)
    self.assertEqual(sorted(train_losses(self.full_dir)), list(range(1, 7)))
    self.assertGreater(os.path.getsize(os.path.join(self.full_dir, "loss.png")), 1000)
    self.assertEqual(ckpt_lib.complete_steps(os.path.join(self.full_dir, "checkpoints")), [3, 6])
    events = [f for f in os.listdir(os.path.join(self.full_dir, "logs"))
              if f.startswith("events.out.tfevents")]
    self.assertLen(events, 1)

  def test_rerunning_a_finished_run_only_evaluates(self):
    again = train_and_evaluate(tiny_config(), self.full_dir)
    self.assertEqual((again["start_step"], again["step"]), (6, 6))
    self.assertEqual(again["eval_loss"], self.full["eval_loss"])

  def test_sigterm_then_resume_is_bit_exact(self):
    workdir = os.path.join(self.root, "preempted")
    first = train_and_evaluate(tiny_config(), workdir, preempt_at_step=2)
    self.assertTrue(first["preempted"])
    self.assertEqual(ckpt_lib.complete_steps(os.path.join(workdir, "checkpoints")), [2])
    second = train_and_evaluate(tiny_config(), workdir)
    self.assertEqual(second["start_step"], 2)
    full, resumed = train_losses(self.full_dir), train_losses(workdir)
    self.assertEqual({s: resumed[s] for s in range(3, 7)}, {s: full[s] for s in range(3, 7)})
    self.assertEqual(second["eval_loss"], self.full["eval_loss"])

  def test_profiled_steps_write_a_trace_and_a_summary_and_train_the_same(self):
    workdir = os.path.join(self.root, "profiled")
    result = train_and_evaluate(tiny_config(profile_steps=2, profile_start=2), workdir)
    profile_dir = os.path.join(workdir, "profile")
    with open(os.path.join(profile_dir, "summary.txt")) as f:
      summary = f.read()
    self.assertTrue(summary.startswith("steps 2..3: "), summary)
    if jax.default_backend() == "cpu":   # CPU traces carry no per-kernel device events
      self.assertIn("no device kernels", summary)
    traces = [os.path.join(d, f) for d, _, files in os.walk(profile_dir) for f in files
              if f.endswith(".xplane.pb")]
    self.assertLen(traces, 1)
    self.assertEqual(train_losses(workdir), train_losses(self.full_dir))
    self.assertEqual(result["eval_loss"], self.full["eval_loss"])
    resumed = train_and_evaluate(tiny_config(profile_steps=2, profile_start=2, steps=7), workdir)
    self.assertEqual(resumed["start_step"], 6)          # past the window: not profiled again
    self.assertLen([f for _, _, files in os.walk(profile_dir) for f in files
                    if f.endswith(".xplane.pb")], 1)

  def test_context_parallel_training_follows_the_single_device_run(self):
    """mesh data=2 x context=2 (each sequence over two devices, one TNT shard each): the same
    losses as the data-parallel run up to float32 reduction order."""
    workdir = os.path.join(self.root, "context")
    result = train_and_evaluate(tiny_config(**{"mesh.context": 2}), workdir)
    full, parallel = train_losses(self.full_dir), train_losses(workdir)
    self.assertEqual(sorted(parallel), sorted(full))
    np.testing.assert_allclose([parallel[s] for s in sorted(full)],
                               [full[s] for s in sorted(full)], rtol=1e-4)
    np.testing.assert_allclose(result["eval_loss"], self.full["eval_loss"], rtol=1e-4)

  def test_stage_two_trains_only_local_memories(self):
    workdir = os.path.join(self.root, "stage2")
    config = tiny_config("stage=2", steps=2, checkpoint_every=2,
                         init_from=os.path.join(self.full_dir, "checkpoints"))
    self.assertEqual(tuple(config.model.mixer_options.tnt.local_chunks), (1,))
    train_and_evaluate(config, workdir)
    before = ckpt_lib.read_params_tree(os.path.join(self.full_dir, "checkpoints"))
    after = ckpt_lib.read_params_tree(os.path.join(workdir, "checkpoints"))
    changed_local = 0
    for (path, b), a in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                            jax.tree.leaves(after)):
      if is_local_memory_param(path):
        changed_local += int(not np.array_equal(a, b))
      else:
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    self.assertGreater(changed_local, 0)

  def test_stage_two_rejects_a_non_tnt_checkpoint(self):
    titans_dir = os.path.join(self.root, "titans")
    train_and_evaluate(tiny_config("mixer=titans", steps=1, checkpoint_every=1), titans_dir)
    config = tiny_config("stage=2", init_from=os.path.join(titans_dir, "checkpoints"))
    with self.assertRaisesRegex(ValueError, r"not a TNT model"):
      train_and_evaluate(config, os.path.join(self.root, "bad_stage2"))

  def test_stage_two_rejects_a_shape_incompatible_checkpoint(self):
    config = tiny_config("stage=2", init_from=os.path.join(self.full_dir, "checkpoints"))
    config.model.d_model = 48
    with self.assertRaisesRegex(ValueError, r"shape"):
      train_and_evaluate(config, os.path.join(self.root, "bad_shapes"))

  def test_non_finite_loss_stops_with_the_step_named(self):
    workdir = os.path.join(self.root, "nan")
    config = tiny_config(**{"optim.lr": 1e30, "optim.warmup_steps": 1, "checkpoint_every": 1,
                            "optim.clip_norm": 1e30})
    with self.assertRaisesRegex(FloatingPointError, r"non-finite training loss .* at step \d"):
      train_and_evaluate(config, workdir)
    for step in ckpt_lib.complete_steps(os.path.join(workdir, "checkpoints")):
      params = ckpt_lib.read_params_tree(os.path.join(workdir, "checkpoints", str(step)))
      self.assertTrue(all(np.isfinite(x).all() for x in jax.tree.leaves(params)))


class BadInputTest(absltest.TestCase):

  def test_missing_data_path(self):
    config = tiny_config(**{"data.source": "files", "data.path": "/no/such/file.txt"})
    with self.assertRaisesRegex(ValueError, "/no/such/file.txt"):
      train_and_evaluate(config, tempfile.mkdtemp())

  def test_batch_that_does_not_divide_over_the_mesh(self):
    config = tiny_config(**{"data.batch_size": 3})
    with self.assertRaisesRegex(ValueError, r"batch_size=3 does not divide over the mesh"):
      train_and_evaluate(config, tempfile.mkdtemp())

  def test_context_split_that_cuts_a_local_shard(self):
    config = tiny_config(**{"mesh.context": 4})   # 32 tokens / 4 = 8 < S_L = 16
    with self.assertRaisesRegex(ValueError, r"= 8 is not a multiple of local 0's shard length "
                                            r"S_L=16"):
      train_and_evaluate(config, tempfile.mkdtemp())
    config = tiny_config("mixer=swa", **{"mesh.context": 4, "model.window": 12})
    with self.assertRaisesRegex(ValueError, r"SWA window 12 needs 11 tokens"):
      train_and_evaluate(config, tempfile.mkdtemp())

  def test_profile_window_outside_the_run_or_over_an_evaluation(self):
    for overrides, message in [
        (dict(profile_steps=-1), r"profile_steps=-1 must be >= 0"),
        (dict(profile_steps=3, profile_start=5), r"profiled steps 5..7 .* within the run's "
                                                 r"steps 1..6"),
        (dict(profile_steps=2, profile_start=0), r"profiled steps 0..1"),
        (dict(profile_steps=3, profile_start=3), r"evaluation after step 4 \(eval_every=4\)")]:
      with self.subTest(**overrides), self.assertRaisesRegex(ValueError, message):
        train_and_evaluate(tiny_config(**overrides), tempfile.mkdtemp())

  def test_deterministic_run_needs_its_xla_flags_before_the_backend_starts(self):
    jax.devices()     # the backend has started in this process; XLA_FLAGS lacks the flags here
    with self.assertRaisesRegex(ValueError, r"--xla_gpu_deterministic_ops=true .* "
                                            r"experiments/train.py"):
      train_and_evaluate(tiny_config(deterministic=True), tempfile.mkdtemp())

  def test_mesh_axes_must_use_every_device(self):
    with self.assertRaisesRegex(ValueError, r"data=3 x fsdp=1 must use all 4 devices"):
      mesh_lib.mesh_shape(3, 1, 4)

  def test_unknown_config_key_on_the_command_line(self):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", CONFIG_FILE, flag_values=values,
                                    lock_config=True)
    with self.assertRaisesRegex(flags.UnrecognizedFlagError, "config.model.no_such_key"):
      values(["train", "--config.model.no_such_key=1"])

  def test_unknown_config_argument_and_mixer_option(self):
    with self.assertRaisesRegex(ValueError, r"unknown config arguments \['sise'\]"):
      get_config("sise=tiny")
    config = tiny_config()
    config.model.mixer_options.tnt.chunk_size = 8
    with self.assertRaisesRegex(ValueError, r"mixer_options for 'tnt'.*chunk_size"):
      train_and_evaluate(config, tempfile.mkdtemp())

  def test_stage_two_needs_a_tnt_model(self):
    with self.assertRaisesRegex(ValueError, "stage=2 adapts TNT's local memories"):
      get_config("mixer=titans,stage=2")

  def test_tnt_memory_inside_a_hybrid_counts_for_stage_two(self):
    from tnt_jax.train.trainer import has_tnt_memory, lm_config
    for mixer, want in (("mag:tnt", True), ("mac:tnt", True), ("swa+tnt", True),
                        ("mag:titans", False), ("titans", False)):
      config = get_config(f"mixer={mixer}")
      self.assertEqual(has_tnt_memory(lm_config(config, vocab_size=256)), want, mixer)
    get_config("mixer=mag:tnt,stage=2")   # the config accepts it too

  def test_memory_argument_sets_every_tnt_and_titans_memory(self):
    from tnt_jax.train.trainer import lm_config
    lm = lm_config(get_config("mixer=tnt+titans,memory=linear"), vocab_size=256)
    tnt, titans = (lm.mixer_config(layer).memory_config() for layer in (0, 1))
    memories = (tnt.global_memory, *(local.memory for local in tnt.local_memories),
                titans.global_memory)
    self.assertEqual({memory.model.kind for memory in memories}, {"linear"})
    self.assertNotIn("global_model", get_config("").model.mixer_options.tnt)  # default as before
    with self.assertRaisesRegex(ValueError, "kind='lstm' is unknown"):
      get_config("memory=lstm")
    with self.assertRaisesRegex(ValueError, "sets the model of TNT and Titans memories"):
      get_config("mixer=attention,memory=linear")

  def test_implementation_argument_sets_every_memory_mixer(self):
    options = get_config("mixer=tnt+titans+swa,implementation=pallas").model.mixer_options
    self.assertEqual({o["implementation"] for o in options.values()}, {"pallas"})
    self.assertEqual(sorted(options), ["titans", "tnt"])
    self.assertEqual(get_config("").model.mixer_options.tnt.implementation, "xla")
    with self.assertRaisesRegex(ValueError, "implementation='triton' is unknown"):
      get_config("implementation=triton")
    with self.assertRaisesRegex(ValueError, "sets the memory mixers' op"):
      get_config("mixer=attention,implementation=pallas")
    # Several GPUs then compile on GSPMD (Shardy segfaults on the kernels under shard_map).
    kernels = lambda arg: runs_kernels(lm_config(get_config(arg), 256))
    self.assertTrue(kernels("mixer=swa+mag:tnt,implementation=pallas"))
    self.assertFalse(kernels("mixer=swa+mag:tnt"))
    self.assertFalse(kernels("mixer=attention"))


if __name__ == "__main__":
  absltest.main()
