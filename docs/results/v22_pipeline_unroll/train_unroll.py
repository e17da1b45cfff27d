"""experiments/train.py with chunk_memory.PIPELINE_UNROLL set first (argv[1])."""
import sys

from absl import app

from tnt_jax.kernels import chunk_memory

chunk_memory.PIPELINE_UNROLL = int(sys.argv.pop(1))
from experiments import train  # noqa: E402

app.run(train.main)
