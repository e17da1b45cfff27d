"""What the GPU compiler makes of the fused kernel: per kernel, its matrix instructions and spills.

Lowers the kernel-mode cases of experiments/benchmark.py (same flags: --models, --reads,
--chunks, --head_dims, --lengths (the first), --kernel_blocks, --passes), records the Triton IR
of every kernel Pallas' GPU lowering emits, compiles it for sm_90a with the Python `triton`
package (where installed; the same Triton passes XLA runs, from another build) and reports per
kernel: registers, spills, shared memory, and Hopper wgmma vs mma.sync instructions and
local-memory accesses in the PTX. Writes each kernel's .ttir and .ptx under --dump_dir. Runs on any
host (it lowers for CUDA without a GPU); costs compile time, not run time.

    python -m experiments.kernel_ptx --models=mlp --reads=cumulative --chunks=16 \
        --head_dims=64 --lengths=2048 --kernel_blocks=default,layout=features
"""

import os
import re
import subprocess
import sys

from absl import app, flags

from experiments import benchmark

flags.DEFINE_string("dump_dir", "/tmp/kernel_ptx", "where each kernel's PTX is written")
FLAGS = flags.FLAGS

_COUNTED = {"wgmma": r"\bwgmma\.mma_async", "mma.sync": r"\bmma\.sync", "ld.local":
            r"\bld\.local", "st.local": r"\bst\.local"}


def capture_triton_ir():
  """Record the Triton IR (TTIR text) and warp count of every kernel Pallas' GPU lowering emits.
  Returns the list the records are appended to: (ttir, num_warps, num_stages)."""
  from jax._src.pallas.triton import lowering
  records = []
  lower = lowering.lower_jaxpr_to_triton_module

  def recording_lower(*args, **kwargs):
    result = lower(*args, **kwargs)
    params = sys._getframe(1).f_locals.get("triton_params")   # the caller's CompilerParams
    records.append((result.module.operation.get_asm(), getattr(params, "num_warps", 4) or 4,
                    getattr(params, "num_stages", 1) or 1))
    return result

  recording_lower.original = lower
  lowering.lower_jaxpr_to_triton_module = recording_lower
  return records


def release_triton_ir():
  """Undo `capture_triton_ir`."""
  from jax._src.pallas.triton import lowering
  lowering.lower_jaxpr_to_triton_module = getattr(lowering.lower_jaxpr_to_triton_module,
                                                  "original",
                                                  lowering.lower_jaxpr_to_triton_module)


def kernel_name(ttir: str) -> str:
  """The kernel's function name in its Triton IR."""
  found = re.search(r"tt\.func (?:public )?@(\w+)", ttir)
  return found.group(1) if found else "?"


def compile_ttir(path: str, num_warps: int, num_stages: int):
  """(ptx, ptxas report, shared bytes) from Triton's own compiler for an sm_90a target: the same
  passes XLA runs on the kernel, from the Python `triton` package (not XLA's build), then ptxas
  -v (Triton's bundled ptxas) for registers and spills."""
  import triton
  from triton.backends.compiler import GPUTarget
  compiled = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
  ptx = compiled.asm["ptx"]
  ptx_path = path[:-len(".ttir")] + ".ptx"
  with open(ptx_path, "w") as f:
    f.write(ptx)
  ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
  result = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx_path, "-o", os.devnull],
                          capture_output=True, text=True, check=False)
  found = [re.search(pattern, result.stderr) for pattern in (
      r"Used (\d+) registers", r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) "
      r"bytes spill loads")]
  if not all(found):
    report = f"ptxas: {(result.stderr.strip().splitlines() or ['no report'])[-1][:200]}"
  else:
    report = (f"{found[0].group(1)} regs, stack {found[1].group(1)} B, spills "
              f"{found[1].group(2)} B stored / {found[1].group(3)} B loaded")
  return ptx, report, compiled.metadata.shared


def kernel_case(config, blocks, backward):
  """The compiled GPU kernel itself (no platform check, so a CPU host can lower it for CUDA)."""
  import jax
  import jax.numpy as jnp
  from tnt_jax.kernels.chunk_memory import kernel_memory

  def forward(q, k, v, gates, state, slow):
    del slow
    return kernel_memory(q, k, v, gates, state, config, driver="chunk_loop", interpret=False,
                         blocks=blocks)

  if not backward:
    return forward

  def loss(*args):
    out, final = forward(*args)
    return jnp.mean(out.astype(jnp.float32) ** 2) + sum(jnp.mean(x)
                                                         for x in jax.tree.leaves(final))
  return jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  records = capture_triton_ir()
  b, h, length = FLAGS.batch, FLAGS.heads, int(FLAGS.lengths[0])
  dtype = jnp.dtype(FLAGS.dtype)
  os.makedirs(FLAGS.dump_dir, exist_ok=True)
  for head_dim in map(int, FLAGS.head_dims):
    for model_name, read, chunk, config in benchmark.memory_configs():
      for label, implementation, blocks in benchmark.kernel_implementations():
        if implementation != "pallas":
          continue
        for pass_name in FLAGS.passes:
          tag = re.sub(r"\W", "_", f"{model_name}_{read}_c{chunk}_d{head_dim}_{label}_"
                                   f"{pass_name}")
          case = kernel_case(config, blocks, pass_name == "fwd+bwd")
          args = benchmark.op_inputs(config, b, length, h, head_dim, dtype)
          del records[:]
          jax.jit(case).trace(*args).lower(lowering_platforms=("cuda",))
          print(f"== {tag}: {len(records)} Triton kernel(s)")
          for i, (ttir, num_warps, num_stages) in enumerate(records):
            path = os.path.join(FLAGS.dump_dir, f"{tag}_{i}.ttir")
            with open(path, "w") as f:
              f.write(ttir)
            name = kernel_name(ttir)
            try:
              ptx, report, smem = compile_ttir(path, num_warps, num_stages)
            except Exception as e:  # a Triton version that cannot read this IR: say so, go on
              print(f"  {name} ({num_warps} warps): triton failed: "
                    f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
              continue
            counts = ", ".join(f"{k} {len(re.findall(pat, ptx))}" for k, pat in _COUNTED.items())
            print(f"  {name} ({num_warps} warps): {report}; smem {smem} B; {counts}")


if __name__ == "__main__":
  app.run(main)
