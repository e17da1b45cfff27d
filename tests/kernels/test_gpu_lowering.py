"""The compiled GPU kernel lowers to Triton IR from any host (kernels/gpu_lowering.py).

Lowering for CUDA needs no GPU: it runs the Pallas Triton lowering of every kernel the op emits,
so an operation that lowering cannot take fails here, on the CPU CI, rather than on the first GPU
run. (Compiling that IR to PTX needs Triton: experiments/kernel_ptx.py, not a test.)
"""

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp

from tnt_jax.kernels.chunk_memory import KernelBlocks
from tnt_jax.kernels.gpu_lowering import lower_kernels
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule
from tests.helpers import random_inputs


class GpuLoweringTest(parameterized.TestCase):

  @parameterized.parameters(("linear", "features", True), ("mlp", "tokens", True),
                            ("swiglu", "features", False))
  def test_every_kernel_lowers_to_triton_ir(self, kind, layout, backward):
    config = MemoryConfig(MemoryModel(kind, expansion=2.0), UpdateRule("titans"), "l2",
                          "cumulative", 16)
    args = random_inputs(config, jax.random.key(0), batch=1, length=40, heads=2, head_dim=64,
                         dtype=jnp.bfloat16)[:5]
    kernels = lower_kernels(config, KernelBlocks(layout=layout), backward, args)
    names = sorted({kernel.name for kernel in kernels})
    directions = ["bwd", "fwd"] if backward else ["fwd"]
    self.assertEqual(names, [f"chunk_memory_{d}_{kind}_titans_{layout}" for d in directions])
    for kernel in kernels:
      self.assertIn("tt.dot", kernel.ttir)
      self.assertEqual(kernel.num_warps, 4 if kind == "linear" else 8)

  @parameterized.parameters("mlp", "swiglu")
  def test_tile_kernel_lowers_to_triton_ir(self, kind):
    """A chunk-start read past the row kernel's limit, with the opt-in tile kernel."""
    config = MemoryConfig(MemoryModel(kind, expansion=2.0), UpdateRule("titans"), "l2",
                          "chunk_start", 2048)
    args = random_inputs(config, jax.random.key(0), batch=1, length=2100, heads=2,
                         head_dim=64, dtype=jnp.bfloat16)[:5]
    kernels = lower_kernels(config, KernelBlocks(tile=32), True, args)
    self.assertEqual(sorted({kernel.name for kernel in kernels}),
                     [f"chunk_start_tiles_{d}_{kind}" for d in ("bwd", "fwd")])
    for kernel in kernels:
      self.assertIn("tt.dot", kernel.ttir)
      self.assertEqual(kernel.num_warps, 8)


if __name__ == "__main__":
  absltest.main()
