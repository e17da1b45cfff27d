"""experiments/compare_runs.py: the time axis it derives from logged tokens/s."""

from absl.testing import absltest

from experiments.compare_runs import training_seconds


class TrainingSecondsTest(absltest.TestCase):

  def test_cumulative_seconds_from_interval_rates(self):
    history = {"tokens_per_s": [(10, 100.0), (20, 200.0), (40, 50.0)]}
    # The first interval holds the compile and is the origin; then 10 steps of 10 tokens at
    # 200/s = 0.5 s, and 20 more at 50/s = 4 s.
    self.assertEqual(training_seconds(history, 10), {10: 0.0, 20: 0.5, 40: 4.5})


if __name__ == "__main__":
  absltest.main()
