"""The README's example runs as written and agrees with the reference (bf16 tolerance)."""

import pathlib
import re

from absl.testing import absltest
import numpy as np


class ReadmeExampleTest(absltest.TestCase):

  def test_example_runs_and_matches_reference(self):
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    code = re.search(r"```python\n(.*?)```", readme.read_text(), re.S).group(1)
    scope = {}
    exec(compile(code, str(readme), "exec"), scope)
    out = np.asarray(scope["out"], np.float32)
    ref = np.asarray(scope["ref"], np.float32)
    self.assertTrue(np.all(np.isfinite(out)))
    self.assertLess(np.linalg.norm(out - ref) / np.linalg.norm(ref), 2e-2)


if __name__ == "__main__":
  absltest.main()
