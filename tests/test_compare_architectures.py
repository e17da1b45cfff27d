"""experiments/compare_architectures.py: every architecture's config builds a model config, and
the table and plot come from the rows (a rerun replaces a row; failures are listed)."""

import importlib
import json
import os
import tempfile

from absl.testing import absltest

from experiments import compare_architectures as compare
from tnt_jax.train import trainer


class ArchitecturesTest(absltest.TestCase):

  def test_every_architecture_builds_at_tiny_size(self):
    for name, spec in compare.ARCHITECTURES.items():
      path, _, args = spec.partition(":")
      module = importlib.import_module(path[:-len(".py")].replace("/", "."))
      config = module.get_config(",".join(filter(None, [args, "size=tiny"])))
      model_config = trainer.lm_config(config, vocab_size=256)
      self.assertTrue(model_config.pattern, name)

  def test_table_sorts_by_eval_loss_and_lists_failures(self):
    with tempfile.TemporaryDirectory() as out:
      row = dict(pattern="tnt", params=2e6, steps=2, tokens=2048, eval_bits=3.0,
                 tokens_per_s=1e4, wall_s=10.0, peak_memory_gb=None, device="cpu",
                 train_loss=[[1, 5.0], [2, 4.0]])
      rows = [dict(row, name="a", eval_loss=3.0), dict(row, name="b", eval_loss=2.5),
              dict(row, name="a", eval_loss=2.0),          # a rerun of "a" replaces it
              dict(name="c", error="stopped after --run_timeout=5 s")]
      path = os.path.join(out, "architectures.jsonl")
      with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
      compare.write_table_and_plot(path)
      table = open(os.path.join(out, "architectures.md")).read().splitlines()
      self.assertTrue(table[2].startswith("| a |") and "2.0000" in table[2], table)
      self.assertTrue(table[3].startswith("| b |"), table)
      self.assertIn("| c | failed: stopped after --run_timeout=5 s", table[4])
      self.assertTrue(os.path.getsize(os.path.join(out, "architectures.png")) > 0)


if __name__ == "__main__":
  absltest.main()
