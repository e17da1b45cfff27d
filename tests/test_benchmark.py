"""experiments/benchmark.py's parsing of the kernel settings it compares."""

from absl.testing import absltest

from experiments import benchmark
from tnt_jax.kernels.chunk_memory import KernelBlocks


class KernelBlocksFlagTest(absltest.TestCase):

  def test_entries_become_kernel_blocks(self):
    self.assertEqual(benchmark.parse_kernel_blocks("default"), KernelBlocks())
    self.assertEqual(benchmark.parse_kernel_blocks("save_every=1+backward_num_warps=4"),
                     KernelBlocks(save_every=1, backward_num_warps=4))
    self.assertEqual(benchmark.parse_kernel_blocks("backward=xla"), KernelBlocks(backward="xla"))

  def test_bad_entries_name_the_rule(self):
    with self.assertRaisesRegex(ValueError, "'warps=4' must be field=value with a KernelBlocks"):
      benchmark.parse_kernel_blocks("warps=4")
    with self.assertRaisesRegex(ValueError, "save_every=0 must be an integer >= 1"):
      benchmark.parse_kernel_blocks("save_every=0")


if __name__ == "__main__":
  absltest.main()
