"""The Pallas kernels compiled for TPUs on any host, by libtpu's compile-only client (tnt_jax/aot.py).

The kernels' numbers are checked against the reference under the TPU interpreter
(test_chunk_memory.py's ChunkMemoryKernelTPUInterpretTest). What the interpreter does not check --
Mosaic TPU's lowering rules, layouts, tiling and VMEM, and that a kernel inside a data-parallel
step can be partitioned -- is what libtpu's compiler checks here, for real TPU generations,
forward and backward. Nothing runs. Skipped where libtpu is not installed (the test extra
installs it on Linux x86-64).
"""

import dataclasses

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.tnt_lm import get_config
from tests.kernels.test_chunk_memory import MODELS, RULE_READS, _config, _inputs, tnt_case
from tnt_jax import aot
from tnt_jax.kernels import chunk_memory
from tnt_jax.kernels.chunk_memory import KernelBlocks, kernel_memory
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.ops.api import memory_op
from tnt_jax.ops.tnt import tnt_op

TOPOLOGY = "v5e:2x2"


def _loss_of_outputs(fn):
  """A scalar of fn's outputs and final state, so its gradient runs the kernel's backward."""
  def loss(args):
    out, state = fn(*args)
    return jnp.sum(out.astype(jnp.float32)) + sum(jnp.sum(x) for x in jax.tree.leaves(state))
  return loss


class TPUCompileTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    reason = aot.libtpu_missing_reason()
    if reason is not None:
      self.skipTest(reason)

  def _compile(self, fn, args, topology=TOPOLOGY, mesh_shape=(1,), axis_names=("x",),
               spec=P()):
    """fn(args) compiled for `topology`, args placed by `spec` on a mesh of its devices."""
    mesh = aot.tpu_mesh(topology, mesh_shape, axis_names)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, spec if x.ndim else P())), args)
    with jax.set_mesh(mesh):
      return jax.jit(fn).lower(shapes).compile()

  def _check_kernel_grad(self, config, args, blocks=KernelBlocks(), topology=TOPOLOGY):
    """Forward and backward compile, with the kernels (not a fallback) in the executable."""
    kernel = lambda *a: kernel_memory(*a, config, blocks=blocks)
    compiled = self._compile(jax.grad(_loss_of_outputs(kernel)), args, topology)
    # The forward, and the backward's re-run and reverse walk.
    self.assertGreaterEqual(aot.kernel_calls(compiled), 2)

  @parameterized.product(model=tuple(MODELS), rule_read=tuple(RULE_READS),
                         dtype=("float32", "bfloat16"))
  def test_row_kernel(self, model, rule_read, dtype):
    config = _config(model, rule_read)
    checked = 0
    for head_dim in (64, 128):
      # The GPU-measured state budgets apply on TPU too: a float32 mlp at d 128 is refused.
      if chunk_memory.unsupported_reason(config, head_dim, getattr(jnp, dtype),
                                         driver="sequential_grid", interpret=False):
        continue
      with self.subTest(head_dim=head_dim):   # 40 tokens: two chunks of 16 and a partial one
        self._check_kernel_grad(config, _inputs(config, head_dim, getattr(jnp, dtype), 0))
        checked += 1
    self.assertGreater(checked, 0)

  @parameterized.parameters("v6e:2x2", "v5p:2x2x1", "v4:2x2x1")
  def test_other_generations(self, topology):
    config = _config("mlp", "titans_cumulative")
    self._check_kernel_grad(config, _inputs(config, 128, jnp.bfloat16, 1), topology=topology)

  def test_swiglu_hidden_slices_and_save_every(self):
    swiglu = MemoryConfig(MemoryModel("swiglu", expansion=1.0), UpdateRule("titans"), "l2",
                          "cumulative", 16)
    self._check_kernel_grad(swiglu, _inputs(swiglu, 64, jnp.bfloat16, 2))
    wide = MemoryConfig(MemoryModel("mlp", expansion=2.0), UpdateRule("titans"), "l2",
                        "chunk_start", 16)
    self._check_kernel_grad(wide, _inputs(wide, 64, jnp.bfloat16, 3, length=64),
                            KernelBlocks(hidden_slice=32, save_every=1))

  def test_linear_rows_split_by_output_feature(self):
    # value_split: the programs of a row share its q, k and gates (a BlockSpec index of
    # row // split), which Mosaic TPU must take as well.
    config = _config("linear", "titans_cumulative")
    self._check_kernel_grad(config, _inputs(config, 128, jnp.bfloat16, 5),
                            KernelBlocks(value_split=4))

  def test_tile_kernel_for_large_chunk_start_chunks(self):
    config = MemoryConfig(MODELS["mlp"], UpdateRule("titans"), "l2", "chunk_start", 64)
    self._check_kernel_grad(config, _inputs(config, 64, jnp.bfloat16, 4, length=128),
                            KernelBlocks(tile=32, max_chunk_activations=512))

  @parameterized.parameters("v4:2x2x1", "v5p:2x2x1")
  def test_the_tpu_state_budget_fits_vmem(self, topology):
    """The TPU driver's budgets (chunk_memory.DRIVER_BUDGETS) take the Titans mlp at d = 128
    with hidden 512 (a 1 MiB float32 state; the GPU's budget refuses it) and compile within
    the 16 MiB of scoped VMEM of v4 and v5p, float32 included; twice that state is refused."""
    config = MemoryConfig(MemoryModel("mlp", expansion=4.0), UpdateRule("titans"), "l2",
                          "cumulative", 16)
    reason = lambda driver, model=config.model: chunk_memory.unsupported_reason(
        dataclasses.replace(config, model=model), 128, jnp.float32, driver=driver,
        interpret=False)
    self.assertIsNone(reason("sequential_grid"))
    self.assertIn("max_state_bytes=262144", reason("chunk_loop"))
    self.assertIn("2097152 bytes > KernelBlocks.max_state_bytes=1048576",
                  reason("sequential_grid", model=MemoryModel("mlp", expansion=8.0)))
    self._check_kernel_grad(config, _inputs(config, 128, jnp.float32, 7, length=48),
                            topology=topology)

  def test_tnt_op_through_the_api(self):
    """implementation="pallas" picks the TPU driver from the mesh's devices (the host is not a
    TPU) for the global memory and both locals."""
    config, args = tnt_case(length=96, head_dim=128, dtype=jnp.bfloat16)
    tnt = lambda *a: tnt_op(*a, config, implementation="pallas")
    compiled = self._compile(jax.grad(_loss_of_outputs(tnt)), args)
    self.assertGreaterEqual(aot.kernel_calls(compiled), 6)   # 3 memories, forward + backward

  def test_data_parallel_kernel_is_split_over_the_mesh(self):
    """Under a 4-chip mesh with the batch split over it, the kernel runs in shard_map on each
    chip's rows. Without that split Mosaic refuses to compile: XLA cannot partition a kernel."""
    config = _config("mlp", "titans_cumulative")
    args = jax.tree.map(lambda x: jnp.concatenate([x] * 4) if x.ndim else x,
                        _inputs(config, 128, jnp.bfloat16, 6))
    op = lambda *a: memory_op(*a, {}, config, implementation="pallas")
    compiled = self._compile(jax.grad(_loss_of_outputs(op)), args[:5], mesh_shape=(2, 2),
                             axis_names=("data", "fsdp"), spec=P(("data", "fsdp")))
    self.assertGreaterEqual(aot.kernel_calls(compiled), 2)

  def test_training_step_of_a_tnt_model(self):
    """The tiny TNT LM's data-parallel training step on 4 chips, its memories on the kernel:
    what experiments/tpu_compile.py compiles."""
    config = get_config("size=tiny,memory=linear")
    config.model.mixer_options.tnt.implementation = "pallas"
    config.data.batch_size, config.data.seq_len = 8, 256
    compiled, mesh = aot.train_step_for_tpu(config, TOPOLOGY)
    self.assertEqual(dict(mesh.shape), {"data": 4, "fsdp": 1, "context": 1})
    self.assertGreaterEqual(aot.kernel_calls(compiled), 4)
    self.assertGreater(compiled.memory_analysis().temp_size_in_bytes, 0)

  def test_bad_topology_and_mesh_are_named(self):
    with self.assertRaisesRegex(ValueError, "topology='v9z:2x2' is not a TPU topology"):
      aot.tpu_devices("v9z:2x2")
    with self.assertRaisesRegex(ValueError, r"mesh shape \(8,\) needs 8 devices; "
                                            r"topology='v5e:2x2' has 4"):
      aot.tpu_mesh("v5e:2x2", (8,), ("data",))


if __name__ == "__main__":
  absltest.main()
