"""How far the compiled mlp row kernels (Mosaic GPU and the Pallas/Triton rows) land from their
own jnp reference (the same bf16 operand roundings), per state leaf and for the outputs."""
import jax, jax.numpy as jnp
from tests.kernels.test_chunk_memory import _inputs
from tnt_jax.kernels.chunk_memory import KernelBlocks, kernel_memory, kernel_memory_reference
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule

for rule, read, exp in (("titans", "cumulative", 4.0), ("gd", "chunk_start", 2.0)):
  config = MemoryConfig(MemoryModel("mlp", depth=2, expansion=exp), UpdateRule(rule), "l2", read, 16)
  args = _inputs(config, 64, jnp.bfloat16, 11, 70)
  want = jax.jit(lambda a: kernel_memory_reference(*a, config))(args)
  for name, blocks in (("mosaic", KernelBlocks(row_lowering="mosaic_gpu")),
                       ("pallas features", KernelBlocks(layout="features", row_lowering="pallas")),
                       ("pallas tokens", KernelBlocks(layout="tokens", row_lowering="pallas"))):
    got = kernel_memory(*args, config, blocks=blocks)
    errs = [float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()
                  / jnp.abs(b.astype(jnp.float32)).max())
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    print(f"{rule}/{read}/hidden {int(exp*64)} {name:16s} out {errs[0]:.2e} states "
          + " ".join(f"{e:.2e}" for e in errs[1:]))

# The activations alone: Mosaic GPU's lowering of tanh / exp / the gelu and silu of step_math
# against XLA's on the same [64, 64] float32 inputs.
from jax.experimental import pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
from tnt_jax.kernels.step_math import act_and_grad

def mosaic_map(fn, x):
  def body(x_g, o_g, x_s, o_s, bar):
    plgpu.copy_gmem_to_smem(x_g, x_s, bar)
    plgpu.barrier_wait(bar)
    o_s[...] = fn(x_s[...])
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o_g)
    plgpu.wait_smem_to_gmem(0)
  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, jnp.float32),
                      scratch_types=[plgpu.SMEM(x.shape, jnp.float32)] * 2 + [plgpu.Barrier()],
                      compiler_params=plgpu.CompilerParams(
                          lowering_semantics=plgpu.LoweringSemantics.Warpgroup))(x)

x = 3 * jax.random.normal(jax.random.key(0), (64, 64), jnp.float32)
for name, fn in (("tanh", jnp.tanh), ("exp", jnp.exp), ("sigmoid", jax.nn.sigmoid),
                 ("gelu", lambda z: act_and_grad("gelu", z)[0]),
                 ("gelu'", lambda z: act_and_grad("gelu", z)[1]),
                 ("silu", lambda z: act_and_grad("silu", z)[0])):
  got = mosaic_map(fn, x)
  want = jax.jit(fn)(x.astype(jnp.float64) if jax.config.jax_enable_x64 else x)
  rel = jnp.abs(got - want) / jnp.maximum(jnp.abs(want), 1e-6)
  print(f"mosaic {name:8s} max rel err {float(rel.max()):.2e}")
