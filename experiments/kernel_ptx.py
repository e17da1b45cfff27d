"""What the GPU compiler made of the fused kernel: per kernel, its matrix instructions and spills.

Lowers the kernel-mode cases of experiments/benchmark.py (same flags: --models, --reads,
--chunks, --head_dims, --lengths (the first), --kernel_blocks, --passes), recording the PTX of
every Triton kernel Pallas compiles (jaxlib > 0.10.2 compiles them while lowering), and reports
per kernel: its shared memory, Hopper wgmma vs mma.sync instructions and local-memory accesses in
the PTX, and ptxas' registers, stack frame and spill bytes (ptxas from the CUDA wheels or
Triton's, where installed). GPU only; costs compile time, not run time.

    python -m experiments.kernel_ptx --models=mlp --reads=cumulative --chunks=16 \
        --head_dims=64 --lengths=2048 --kernel_blocks=default,layout=features
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from absl import app, flags

from experiments import benchmark

flags.DEFINE_string("dump_dir", "/tmp/kernel_ptx", "where each kernel's PTX is written")
FLAGS = flags.FLAGS

_COUNTED = {"wgmma": r"\bwgmma\.mma_async", "mma.sync": r"\bmma\.sync", "ld.local":
            r"\bld\.local", "st.local": r"\bst\.local"}


def find_ptxas():
  """ptxas on PATH or in the nvidia-cuda-nvcc wheel jax's CUDA plugin depends on."""
  found = shutil.which("ptxas")
  if found:
    return found
  for root in sys.path:
    for pattern in (("nvidia", "cuda_nvcc", "bin", "ptxas"),
                    ("triton", "backends", "nvidia", "bin", "ptxas")):
      for path in glob.glob(os.path.join(root, *pattern)):
        return path
  return None


def ptx_entries(text: str) -> dict:
  """{kernel name: its PTX body} for every .entry in a PTX module."""
  starts = [(m.start(), m.group(1)) for m in re.finditer(r"\.entry\s+(\w+)", text)]
  bounds = [s for s, _ in starts[1:]] + [len(text)]
  return {name: text[start:end] for (start, name), end in zip(starts, bounds)}


def ptxas_report(ptxas: str, path: str) -> dict:
  """{kernel: 'N registers, S B stack, X B spill stores, Y B spill loads'} from ptxas -v."""
  result = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.devnull],
                          capture_output=True, text=True, check=False)
  report, current = {}, None
  for line in result.stderr.splitlines():
    entry = re.search(r"Compiling entry function '(\w+)'", line)
    if entry:
      current = entry.group(1)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", line)
    if frame and current:
      report[current] = f"stack {frame.group(1)} B, spills {frame.group(2)} B st / " \
                        f"{frame.group(3)} B ld"
    regs = re.search(r"Used (\d+) registers", line)
    if regs and current:
      report[current] = f"{regs.group(1)} regs, " + report.get(current, "")
  if result.returncode:
    report["ptxas"] = result.stderr.strip().splitlines()[-1][:200]
  return report


def capture_triton_ptx():
  """Wrap the Triton compile that Pallas' GPU lowering calls (jaxlib > 0.10.2 compiles Triton
  kernels while lowering), recording each kernel's PTX and shared memory. Returns the list the
  records are appended to: (ptx, smem_bytes)."""
  from jax._src.pallas.triton import pallas_call_registration as registration
  records = []
  compile_fn = registration.triton.compile

  def recording_compile(*args, **kwargs):
    result = compile_fn(*args, **kwargs)
    records.append((result.asm, result.smem_bytes))
    return result

  registration.triton.compile = recording_compile
  return records


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  if jax.default_backend() != "gpu":
    raise SystemExit(f"kernel_ptx reads GPU PTX; the backend is {jax.default_backend()!r}")
  records = capture_triton_ptx()
  ptxas = find_ptxas()
  print(f"ptxas: {ptxas}")
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
          case = benchmark._op_case(config, None, pass_name == "fwd+bwd", implementation,
                                    blocks)
          args = benchmark.op_inputs(config, b, length, h, head_dim, dtype)
          del records[:]
          jax.jit(case).lower(*args)
          print(f"== {tag}: {len(records)} Triton kernel(s)")
          for i, (ptx, smem) in enumerate(records):
            if isinstance(ptx, bytes):
              ptx = ptx.decode()
            path = os.path.join(FLAGS.dump_dir, f"{tag}_{i}.ptx")
            with open(path, "w") as f:
              f.write(ptx)
            report = ptxas_report(ptxas, path) if ptxas else {"ptxas": "not found"}
            for name, body in ptx_entries(ptx).items():
              counts = ", ".join(f"{k} {len(re.findall(pat, body))}"
                                 for k, pat in _COUNTED.items())
              print(f"  {name}: smem {smem} B; {counts}; {report.get(name, '')}")
            if "ptxas" in report:
              print(f"  ptxas: {report['ptxas']}")


if __name__ == "__main__":
  app.run(main)
