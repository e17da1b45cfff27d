"""The README's examples run as written: the memory op agrees with the reference (bf16
tolerance), and the layer example builds, runs and counts its parameters."""

import pathlib
import re

from absl.testing import absltest
import numpy as np


class ReadmeExampleTest(absltest.TestCase):

  def test_example_runs_and_matches_reference(self):
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    code = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)[0]
    scope = {}
    exec(compile(code, str(readme), "exec"), scope)
    out = np.asarray(scope["out"], np.float32)
    ref = np.asarray(scope["ref"], np.float32)
    self.assertTrue(np.all(np.isfinite(out)))
    self.assertLess(np.linalg.norm(out - ref) / np.linalg.norm(ref), 2e-2)


  def test_layer_example_runs(self):
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    code = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)[1]
    scope = {}
    exec(compile(code, str(readme), "exec"), scope)
    self.assertEqual(scope["y"].shape, (2, 50, 64))
    self.assertTrue(np.all(np.isfinite(np.asarray(scope["y"]))))

  def test_generation_example_runs(self):
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    code = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)[2]
    scope = {}
    exec(compile(code, str(readme), "exec"), scope)   # it asserts step == parallel itself
    self.assertEqual(scope["tokens"].shape, (1, 12))
    self.assertTrue(np.all((scope["tokens"] >= 0) & (scope["tokens"] < 256)))


if __name__ == "__main__":
  absltest.main()
