"""The compiled GPU kernel lowers to Triton IR from any host (experiments/kernel_ptx.py's capture).

Lowering for CUDA needs no GPU: it runs the Pallas Triton lowering of every kernel the op emits,
so an operation that lowering cannot take fails here, on the CPU CI, rather than on the first GPU
run. (Compiling that IR to PTX needs Triton and is the script's job, not a test's.)
"""

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp

from experiments import kernel_ptx
from tnt_jax.kernels.chunk_memory import KernelBlocks
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule
from tests.helpers import random_inputs


class GpuLoweringTest(parameterized.TestCase):

  @parameterized.parameters(("linear", "features", True), ("mlp", "tokens", True),
                            ("swiglu", "features", False))
  def test_every_kernel_lowers_to_triton_ir(self, kind, layout, backward):
    config = MemoryConfig(MemoryModel(kind, expansion=2.0), UpdateRule("titans"), "l2",
                          "cumulative", 16)
    q, k, v, gates, state, slow = random_inputs(config, jax.random.key(0), batch=1, length=40,
                                                heads=2, head_dim=64, dtype=jnp.bfloat16)
    records = kernel_ptx.capture_triton_ir()
    try:
      case = kernel_ptx.kernel_case(config, KernelBlocks(layout=layout), backward)
      jax.jit(case).trace(q, k, v, gates, state, slow).lower(lowering_platforms=("cuda",))
    finally:
      kernel_ptx.release_triton_ir()
    names = sorted({kernel_ptx.kernel_name(ttir) for ttir, _, _ in records})
    direction = ["bwd", "fwd"] if backward else ["fwd"]
    self.assertEqual(names, [f"chunk_memory_{d}_{kind}_titans_{layout}" for d in direction])
    for ttir, num_warps, _ in records:
      self.assertIn("tt.dot", ttir)
      self.assertEqual(num_warps, 4 if kind == "linear" else 8)


if __name__ == "__main__":
  absltest.main()
