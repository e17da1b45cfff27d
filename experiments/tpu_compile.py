r"""Compile a training step for a TPU topology on any host (no TPU needed) and report it.

    pip install "jax[tpu]"     # libtpu: its compile-only client (Linux x86-64)
    python -m experiments.tpu_compile --topology=v5e:2x2 \
        --config configs/tnt_lm.py:size=small,memory=linear \
        --config.model.mixer_options.tnt.implementation=pallas

libtpu compiles the step exactly as on the TPU (tnt_jax/aot.py): every Pallas kernel goes through
Mosaic TPU's compiler, and XLA reports each device's memory and the step's FLOPs. Use it to see
that a config compiles for a TPU generation and fits its HBM before asking for the pod. The mesh
is --config.mesh over the topology's devices (data=-1 fills them). Nothing runs: time a step on
the TPU itself.
"""

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the host's own backend; libtpu only compiles
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # other compile-only clients may run

from absl import app, flags  # noqa: E402  (after the platform is chosen)
from ml_collections import config_flags  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "tnt_lm.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "experiment config file[:args]",
                                lock_config=True)
flags.DEFINE_string("topology", "v5e:2x2", "libtpu topology: generation:chips per dimension, "
                    "e.g. v5e:2x2, v6e:4x4, v5p:2x2x2, v4:2x2x1")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from tnt_jax import aot
  start = time.perf_counter()
  compiled, mesh = aot.train_step_for_tpu(FLAGS.config, FLAGS.topology)
  seconds = time.perf_counter() - start
  device = mesh.devices.flat[0]
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = lambda n: f"{n / 2**30:.3f} GiB"
  print(f"topology {FLAGS.topology}: {mesh.devices.size} x {device.device_kind}; mesh "
        f"{dict(mesh.shape)}; compiled in {seconds:.1f} s")
  print(f"Pallas kernel calls: {aot.kernel_calls(compiled)}")
  if memory is not None:
    print(f"per device: arguments {gib(memory.argument_size_in_bytes)}, outputs "
          f"{gib(memory.output_size_in_bytes)}, temporaries {gib(memory.temp_size_in_bytes)}, "
          f"code {gib(memory.generated_code_size_in_bytes)}")
  if cost and "flops" in cost:
    print(f"XLA's FLOP count per device per step: {cost['flops']:.4g}")


if __name__ == "__main__":
  app.run(main)
