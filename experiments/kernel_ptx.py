"""What the GPU compiler makes of the fused kernel: per kernel, its matrix instructions and spills.

Lowers the kernel-mode cases of experiments/benchmark.py (same flags: --models, --reads,
--chunks, --head_dims, --lengths (the first), --kernel_blocks, --passes) for CUDA, takes the
Triton IR of every kernel (tnt_jax/kernels/gpu_lowering.py), compiles it for sm_90a with the
Python `triton` package (where installed; the same Triton passes XLA runs, from another build)
and reports per kernel: registers, stack and spill bytes (ptxas -v), shared memory, and Hopper
wgmma vs mma.sync instructions in the PTX. Writes each kernel's .ttir and .ptx under --dump_dir.
Runs on any host (no GPU needed); costs compile time, not run time.

    python -m experiments.kernel_ptx --models=mlp --reads=cumulative --chunks=16 \
        --head_dims=64 --lengths=2048 --kernel_blocks=default,layout=features
"""

import os
import re
import subprocess

from absl import app, flags

from experiments import benchmark
from tnt_jax.kernels import gpu_lowering

flags.DEFINE_string("dump_dir", "/tmp/kernel_ptx", "where each kernel's .ttir and .ptx go")
FLAGS = flags.FLAGS

_COUNTED = {"wgmma": r"\bwgmma\.mma_async", "mma.sync": r"\bmma\.sync"}


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


def main(argv):
  del argv
  import jax.numpy as jnp
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
          args = benchmark.op_inputs(config, b, length, h, head_dim, dtype)[:5]
          kernels = gpu_lowering.lower_kernels(config, blocks, pass_name == "fwd+bwd", args)
          print(f"== {tag}: {len(kernels)} Triton kernel(s)")
          for i, kernel in enumerate(kernels):
            path = os.path.join(FLAGS.dump_dir, f"{tag}_{i}.ttir")
            with open(path, "w") as f:
              f.write(kernel.ttir)
            what = f"{kernel.name} ({kernel.num_warps} warps)"
            try:
              ptx, report, smem = compile_ttir(path, kernel.num_warps, kernel.num_stages)
            except Exception as e:  # a Triton version that cannot read this IR: say so, go on
              print(f"  {what}: triton failed: "
                    f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
              continue
            counts = ", ".join(f"{k} {len(re.findall(pat, ptx))}" for k, pat in _COUNTED.items())
            print(f"  {what}: {report}; smem {smem} B; {counts}")


if __name__ == "__main__":
  app.run(main)
