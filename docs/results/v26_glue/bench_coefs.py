"""experiments.benchmark with transitions.SEQUENTIAL_MAX_CHUNK set first (argv[1]): 0 runs the
gate coefficients on the associative scan at every chunk size (the code before v26)."""
import sys
from tnt_jax.ops import transitions
transitions.SEQUENTIAL_MAX_CHUNK = int(sys.argv.pop(1))
from absl import app
from experiments import benchmark
sys.argv[0] = "benchmark"
app.run(benchmark.main)
