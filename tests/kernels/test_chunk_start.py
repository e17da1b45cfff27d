"""The chunk-start tile kernel (kernels/chunk_start.py) against the token-level reference.

`ChunkStartTileTest` compiles the kernel for the accelerator it runs on and is skipped elsewhere;
its subclasses interpret the same kernel body on the CPU. Chunks here are past the row kernel's
activation limit, so `kernel_memory` routes them to the tile kernel (as TNT's global memory at
C = 2048 is); lengths are not a multiple of the chunk, and some chunks not of the tile.
"""

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp

from tests.helpers import assert_trees_rel_close
from tests.kernels.test_chunk_memory import KernelTestCase, _inputs, _seed
from tnt_jax.kernels import chunk_memory, chunk_start
from tnt_jax.kernels.chunk_memory import KernelBlocks, kernel_memory
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.ops import chunkwise
from tnt_jax.ops.api import memory_op

MODELS = {"linear": MemoryModel("linear"),
          "mlp": MemoryModel("mlp", depth=2, expansion=1.0, activation="gelu"),
          "swiglu": MemoryModel("swiglu", expansion=1.0)}
# chunk 128 x widest layer 64 > 4096: past the row kernel, so the tile kernel runs. The limit
# is pinned to the GPU driver's for both drivers (the TPU driver's default is larger).
CHUNK, TILE, LENGTH = 128, 32, 300          # 2 whole chunks and a partial one; 4 tiles a chunk
TILES = KernelBlocks(tile=TILE, max_chunk_activations=4096)


def _config(model, rule, loss="l2", chunk=CHUNK):
  return MemoryConfig(MODELS[model], UpdateRule(rule), loss, "chunk_start", chunk)


class ChunkStartTileTest(KernelTestCase):
  """The tile kernel, compiled on the accelerator; subclasses interpret it anywhere."""

  def _check(self, config, head_dim, dtype, seed, blocks=TILES,
             length=LENGTH):
    super()._check(config, head_dim, dtype, seed, blocks, length)

  def _before_check(self, config, head_dim, dtype, blocks):
    for driver in self.DRIVERS:
      resolved = driver or chunk_memory.PLATFORM_DRIVER.get(jax.default_backend(),
                                                            "sequential_grid")
      self.assertTrue(chunk_memory.uses_tiles(config, head_dim, resolved, blocks),
                      "the case must run on the tile kernel")
      reason = chunk_memory.unsupported_reason(config, head_dim, getattr(jnp, dtype),
                                               driver=resolved, interpret=bool(self.INTERPRET),
                                               blocks=blocks)
      if reason is not None:    # a compiled size rule (float32 states); the op falls back
        self.skipTest(f"the compiled kernel refuses this case: {reason}")

  @parameterized.product(model=tuple(MODELS), rule=("gd", "titans"))
  def test_matches_reference_float32(self, model, rule):
    self._check(_config(model, rule), 64, "float32", _seed("tiles", model, rule, "f32"))

  @parameterized.product(model=tuple(MODELS), rule=("gd", "titans"))
  def test_matches_reference_bfloat16(self, model, rule):
    self._check(_config(model, rule), 64, "bfloat16", _seed("tiles", model, rule, "bf16"))

  @parameterized.parameters("mlp", "linear")
  def test_head_dim_128(self, model):
    self._check(_config(model, "titans"), 128, "bfloat16", _seed("tiles128", model))

  def test_dot_loss_and_a_chunk_not_a_multiple_of_the_tile(self):
    # chunk 80 -> tiles of 32 pad it to 96 with identity tokens.
    config = _config("mlp", "titans", loss="dot", chunk=80)
    self._check(config, 64, "float32", _seed("tiles-dot80"), length=170)

  def test_memory_op_pallas_routes_large_chunk_start_reads_to_the_tiles(self):
    config = _config("mlp", "titans")
    q, k, v, g, s = _inputs(config, 64, jnp.float32, 3)
    implementation = "pallas_interpret" if self.INTERPRET else "pallas"
    blocks = TILES
    got = memory_op(q, k, v, g, s, {}, config, implementation=implementation,
                    kernel_blocks=blocks)
    want = chunk_start.tiled_chunk_start_memory(
        q, k, v, g, s, config, interpret=self.INTERPRET, blocks=blocks,
        driver=chunk_memory.PLATFORM_DRIVER.get(jax.default_backend(), "sequential_grid"))
    assert_trees_rel_close(self, got, want, 1e-7, "memory_op")


class ChunkStartTileInterpretTest(ChunkStartTileTest):
  """Both drivers' tile rules interpreted on the CPU, float64 included (the ~1e-6 check)."""

  INTERPRET = True
  DRIVERS = chunk_memory.DRIVERS
  DTYPES = ("float64", "float32", "bfloat16")

  @parameterized.product(model=tuple(MODELS), rule=("gd", "titans"))
  def test_matches_reference_float64(self, model, rule):
    self._check(_config(model, rule), 64, "float64", _seed("tiles", model, rule, "f64"))

  def test_long_scan_is_checkpointed_and_exact(self):
    """More chunks than the unrolled scan takes: the ~sqrt(N)-checkpointed scan."""
    config = _config("linear", "titans", chunk=64)
    length = 64 * (chunkwise.FULL_UNROLL_MAX_CHUNKS + 2) - 5
    self._check(config, 64, "float64", _seed("tiles-long"), length=length,
                blocks=KernelBlocks(tile=16, max_chunk_activations=1024))

  def test_agrees_with_the_xla_path_in_bfloat16(self):
    """Same operand roundings as ops/chunkwise.py: the two differ by accumulation order only."""
    config = _config("mlp", "titans")
    args = _inputs(config, 64, jnp.bfloat16, 21)
    xla = memory_op(*args[:4], args[4], {}, config, implementation="xla")
    tiles = kernel_memory(*args, config, interpret=True, blocks=TILES)
    assert_trees_rel_close(self, tiles, xla, 1e-2, "tiles vs xla")


class ChunkStartTileTPUInterpretTest(ChunkStartTileTest):
  """The TPU driver under the TPU interpreter (Mosaic block rules)."""

  INTERPRET = True
  DRIVERS = ("sequential_grid",)
  DTYPES = ("float32",)

  def _interpret(self):
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams()

  def test_memory_op_pallas_routes_large_chunk_start_reads_to_the_tiles(self):
    self.skipTest("memory_op's pallas_interpret is the generic interpreter")


class ChunkStartTileErrorsTest(parameterized.TestCase):

  def test_tile_must_be_a_power_of_2(self):
    for bad in (48, -16):
      with self.assertRaisesRegex(ValueError,
                                  rf"KernelBlocks.tile={bad} must be 0 \(off\) or a power of 2"):
        KernelBlocks(tile=bad)

  def test_off_by_default(self):
    config = _config("mlp", "titans", chunk=2048)
    self.assertFalse(chunk_memory.uses_tiles(config, 64, "chunk_loop", KernelBlocks()))
    reason = chunk_memory.unsupported_reason(config, 64, jnp.bfloat16, driver="chunk_loop",
                                             interpret=False, blocks=KernelBlocks())
    self.assertIn("KernelBlocks.tile > 0 runs it on the tile kernel", reason or "")

  def test_routing(self):
    blocks = KernelBlocks(tile=32)
    big = _config("mlp", "titans", chunk=2048)
    self.assertTrue(chunk_memory.uses_tiles(big, 64, "chunk_loop", blocks))
    self.assertFalse(chunk_memory.uses_tiles(_config("mlp", "titans", chunk=16), 64,
                                             "chunk_loop", blocks))
    cumulative = MemoryConfig(MODELS["mlp"], UpdateRule("titans"), "l2", "cumulative", 2048)
    self.assertFalse(chunk_memory.uses_tiles(cumulative, 64, "chunk_loop", blocks))
    # The GPU's power-of-2 rule names the tile; a large chunk-start read is no longer refused.
    self.assertIsNone(chunk_memory.unsupported_reason(big, 64, jnp.bfloat16, driver="chunk_loop",
                                                      interpret=False, blocks=blocks))
    reason = chunk_memory.unsupported_reason(big, 48, jnp.bfloat16, driver="chunk_loop",
                                             interpret=False, blocks=blocks)
    self.assertIn("head_dim=48: the GPU lowering needs powers of 2", reason or "")
    # Tiles: the GPU's minimum of 16 tokens, and never more than the chunk (rounded up).
    self.assertEqual(chunk_start.tile_size(2048, KernelBlocks(tile=8), "chunk_loop"), 16)
    self.assertEqual(chunk_start.tile_size(2048, KernelBlocks(tile=8), "sequential_grid"), 8)
    self.assertEqual(chunk_start.tile_size(20, KernelBlocks(tile=32), "sequential_grid"), 32)
    self.assertEqual(chunk_start.tile_size(2048, KernelBlocks(tile=32), "chunk_loop"), 32)

  def test_tiled_op_refuses_a_cumulative_read(self):
    config = MemoryConfig(MODELS["mlp"], UpdateRule("titans"), "l2", "cumulative", CHUNK)
    q, k, v, g, s = _inputs(config, 64, jnp.float32, 1)
    with self.assertRaisesRegex(ValueError, "reads at the chunk start; config.read='cumulative'"):
      chunk_start.tiled_chunk_start_memory(q, k, v, g, s, config, driver="sequential_grid",
                                           interpret=True, blocks=KernelBlocks())


if __name__ == "__main__":
  absltest.main()
