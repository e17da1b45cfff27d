"""experiments/benchmark.py with chunk_memory.PIPELINE_UNROLL set first (argv[1]): times the
pipelined backward's scan at one step a turn against the default in separate processes."""
import sys

from absl import app

from tnt_jax.kernels import chunk_memory

chunk_memory.PIPELINE_UNROLL = int(sys.argv.pop(1))
from experiments import benchmark  # noqa: E402  (after the override, as the benchmark reads it)

app.run(benchmark.main)
