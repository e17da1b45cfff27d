"""What the GPU compiler made of the fused kernel: per kernel, its matrix instructions and spills.

Compiles the kernel-mode cases of experiments/benchmark.py (same flags: --models, --reads,
--chunks, --head_dims, --lengths (the first), --kernel_blocks, --passes) with XLA dumping its PTX,
then reports for every `chunk_memory_*` kernel: Hopper wgmma vs mma.sync instructions in the PTX,
and ptxas' registers, stack frame and spill bytes (ptxas from the CUDA toolkit jax ships with).
GPU only; costs compile time, not run time.

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

flags.DEFINE_string("dump_dir", "/tmp/kernel_ptx", "where XLA dumps the compiled modules "
                    "(emptied first)")
FLAGS = flags.FLAGS

_COUNTED = {"wgmma": r"\bwgmma\.mma_async", "mma.sync": r"\bmma\.sync", "ld.local":
            r"\bld\.local", "st.local": r"\bst\.local"}


def find_ptxas():
  """ptxas on PATH or in the nvidia-cuda-nvcc wheel jax's CUDA plugin depends on."""
  found = shutil.which("ptxas")
  if found:
    return found
  for root in sys.path:
    for path in glob.glob(os.path.join(root, "nvidia", "cuda_nvcc", "bin", "ptxas")):
      return path
  return None


def _is_ptx(path: str) -> bool:
  with open(path, errors="replace") as f:
    head = f.read(4096)
  return ".target sm_" in head or path.endswith(".ptx")


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


def main(argv):
  del argv
  dump = FLAGS.dump_dir
  shutil.rmtree(dump, ignore_errors=True)
  # Read when the GPU client starts, i.e. at the first compile below.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}"
                             " --xla_gpu_dump_llvmir=true")
  import jax
  import jax.numpy as jnp
  if jax.default_backend() != "gpu":
    raise SystemExit(f"kernel_ptx reads GPU PTX; the backend is {jax.default_backend()!r}")
  ptxas = find_ptxas()
  b, h, length = FLAGS.batch, FLAGS.heads, int(FLAGS.lengths[0])
  dtype = jnp.dtype(FLAGS.dtype)
  for head_dim in map(int, FLAGS.head_dims):
    for model_name, read, chunk, config in benchmark.memory_configs():
      for label, implementation, blocks in benchmark.kernel_implementations():
        if implementation != "pallas":
          continue
        for pass_name in FLAGS.passes:
          tag = re.sub(r"\W", "_", f"ptx_{model_name}_{read}_c{chunk}_d{head_dim}_{label}_"
                                   f"{pass_name}")
          case = benchmark._op_case(config, None, pass_name == "fwd+bwd", implementation,
                                    blocks)
          fn = lambda *args, case=case: case(*args)
          fn.__name__ = fn.__qualname__ = tag
          args = benchmark.op_inputs(config, b, length, h, head_dim, dtype)
          jax.jit(fn).lower(*args).compile()
          paths = [path for path in sorted(glob.glob(os.path.join(dump, "**", f"*{tag}*"),
                                                      recursive=True))
                   if os.path.isfile(path) and _is_ptx(path)]
          print(f"== {tag}: {len(paths)} PTX file(s)")
          for path in paths:
            report = ptxas_report(ptxas, path) if ptxas else {"ptxas": "not found"}
            for name, body in ptx_entries(open(path).read()).items():
              if "chunk_memory" not in name:
                continue
              counts = ", ".join(f"{k} {len(re.findall(pat, body))}"
                                 for k, pat in _COUNTED.items())
              print(f"  {name}: {counts}; {report.get(name, '')}")
            if "ptxas" in report:
              print(f"  ptxas: {report['ptxas']}")


if __name__ == "__main__":
  app.run(main)
