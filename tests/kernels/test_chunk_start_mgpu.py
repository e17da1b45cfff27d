"""The Mosaic GPU chunk-start kernels (kernels/chunk_start_mgpu.py) against the token reference.

`MosaicTileTest` compiles them on a Hopper GPU and is skipped elsewhere; `MosaicTileInterpretTest`
runs the same kernel bodies under the Mosaic GPU interpreter on the CPU. The kernels take 16-bit
operands (wgmma), so the check is bfloat16 against the float32 reference (outputs, final states
and every gradient), plus bfloat16 against XLA's path, which rounds the same operands.
"""

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp

from tests.helpers import assert_trees_rel_close
from tests.kernels.test_chunk_memory import KernelTestCase, _inputs, _seed
from tests.kernels.test_chunk_start import CHUNK, LENGTH, MODELS, _config
from tnt_jax.kernels import chunk_memory, chunk_start, chunk_start_mgpu
from tnt_jax.kernels.chunk_memory import KernelBlocks, kernel_memory
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.ops.api import memory_op

# The GPU driver's activation limit, also where the CPU interprets with the TPU driver's.
MOSAIC = KernelBlocks(tile=64, tile_lowering="mosaic_gpu", max_chunk_activations=4096)


class MosaicTileTest(KernelTestCase):
  """Compiled on a Hopper GPU (skipped elsewhere); the subclass interprets the same bodies."""

  DTYPES = ("bfloat16",)

  def setUp(self):
    super().setUp()
    if not self.INTERPRET:
      reason = chunk_start_mgpu.unsupported_reason(MODELS["linear"], 64, jnp.bfloat16,
                                                   compiled=True)
      if reason is not None:
        self.skipTest(reason)

  def _check(self, config, head_dim, seed, blocks=MOSAIC, length=LENGTH):
    super()._check(config, head_dim, "bfloat16", seed, blocks, length)

  def _before_check(self, config, head_dim, dtype, blocks):
    driver = chunk_memory.PLATFORM_DRIVER.get(jax.default_backend(), "sequential_grid")
    self.assertTrue(chunk_memory.uses_tiles(config, head_dim, driver, blocks))
    self.assertIsNone(chunk_memory.unsupported_reason(
        config, head_dim, getattr(jnp, dtype), driver=driver, interpret=bool(self.INTERPRET),
        blocks=blocks))

  @parameterized.product(model=("linear", "mlp"), rule=("gd", "titans"))
  def test_matches_reference(self, model, rule):
    self._check(_config(model, rule), 64, _seed("mgpu", model, rule))

  @parameterized.parameters("linear", "mlp")
  def test_head_dim_128(self, model):
    self._check(_config(model, "titans"), 128, _seed("mgpu128", model))

  def test_splits_of_several_tiles_and_two_hidden_chunks(self):
    """tile 128: one program loops over two wgmma tiles; hidden 256: pass 1 accumulates two
    128-unit chunks and pass 2 runs four slices."""
    memory = MemoryModel("mlp", depth=2, expansion=4.0, activation="silu")
    config = MemoryConfig(memory, UpdateRule("titans"), "l2", "chunk_start", 256)
    self._check(config, 64, _seed("mgpu-wide"), KernelBlocks(tile=128, tile_lowering="mosaic_gpu"),
                length=400)

  def test_dot_loss_and_a_chunk_not_a_multiple_of_the_tile(self):
    # chunk 80 -> padded to 128 with identity tokens (two 64-token tiles).
    self._check(_config("mlp", "titans", loss="dot", chunk=80), 64, _seed("mgpu-dot80"),
                length=170)

  def test_agrees_with_the_xla_path(self):
    """The same operand roundings as ops/chunkwise.py: they differ by accumulation order only."""
    config = _config("mlp", "titans")
    args = _inputs(config, 64, jnp.bfloat16, 23)
    xla = memory_op(*args[:4], args[4], {}, config, implementation="xla")
    mosaic = kernel_memory(*args, config, interpret=self.INTERPRET, blocks=MOSAIC)
    assert_trees_rel_close(self, mosaic, xla, 1e-2, "mosaic vs xla")

  def test_memory_op_routes_to_the_mosaic_kernels(self):
    config = _config("linear", "titans")
    q, k, v, g, s = _inputs(config, 64, jnp.bfloat16, 5)
    calls = []
    real = chunk_start_mgpu.map_pass
    def spy(*args, **kwargs):
      calls.append(kwargs["tile"])
      return real(*args, **kwargs)
    self.enter_context(absltest.mock.patch.object(chunk_start_mgpu, "map_pass", spy))
    memory_op(q, k, v, g, s, {}, config, kernel_blocks=MOSAIC,
              implementation="pallas_interpret" if self.INTERPRET else "pallas")
    self.assertEqual(set(calls), {64})         # traced (once per scan body) with 64-token tiles


class MosaicTileInterpretTest(MosaicTileTest):
  INTERPRET = True


class MosaicTileRulesTest(parameterized.TestCase):
  """Which ops the Mosaic kernels take (no kernel runs)."""

  def _reason(self, model, head_dim=64, dtype=jnp.bfloat16, interpret=True, chunk=2048):
    config = MemoryConfig(model, UpdateRule("titans"), "l2", "chunk_start", chunk)
    return chunk_memory.unsupported_reason(config, head_dim, dtype, driver="chunk_loop",
                                           interpret=interpret, blocks=MOSAIC)

  def test_supported(self):
    self.assertIsNone(self._reason(MemoryModel("mlp", depth=2, expansion=4.0)))
    self.assertIsNone(self._reason(MemoryModel("linear"), head_dim=128))
    self.assertIsNone(self._reason(MemoryModel("mlp", depth=2, expansion=2.0), head_dim=128))

  def test_refusals_name_the_value(self):
    self.assertIn("dtype=float32", self._reason(MemoryModel("linear"), dtype=jnp.float32))
    self.assertIn("dtype=float16", self._reason(MemoryModel("linear"), dtype=jnp.float16))
    self.assertIn("kind='swiglu'", self._reason(MemoryModel("swiglu")))
    self.assertIn("depth=3", self._reason(MemoryModel("mlp", depth=3)))
    self.assertIn("head_dim=32", self._reason(MemoryModel("linear"), head_dim=32))
    # d 128 with hidden 512: both layers' W^T are 256 KiB, past shared memory.
    self.assertIn("pass 1 keeps W0 in shared memory",
                  self._reason(MemoryModel("mlp", depth=2, expansion=4.0), head_dim=128))
    if jax.default_backend() != "gpu":
      self.assertIn("Mosaic GPU kernels run on NVIDIA Hopper GPUs",
                    self._reason(MemoryModel("linear"), interpret=False))

  def test_blocks_spec_and_tiles(self):
    self.assertEqual(KernelBlocks.from_spec("tile=256+tile_lowering=mosaic_gpu"),
                     KernelBlocks(tile=256, tile_lowering="mosaic_gpu"))
    with self.assertRaisesRegex(ValueError, "KernelBlocks.tile_lowering='triton' is unknown"):
      KernelBlocks(tile_lowering="triton")
    # Whole 64-token wgmma tiles, never past the chunk rounded up to a power of 2.
    self.assertEqual(chunk_start.tile_size(2048, MOSAIC, "chunk_loop"), 64)
    self.assertEqual(chunk_start.tile_size(2048, KernelBlocks(tile=16, tile_lowering="mosaic_gpu"),
                                           "chunk_loop"), 64)
    self.assertEqual(chunk_start.tile_size(80, KernelBlocks(tile=512, tile_lowering="mosaic_gpu"),
                                           "chunk_loop"), 128)


if __name__ == "__main__":
  absltest.main()
