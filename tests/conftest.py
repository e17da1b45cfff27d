"""Test-session settings, applied before JAX initialises its backends.

The tests compile hundreds of small graphs on the CPU; XLA's backend optimisations cost more
compile time than they save at these sizes, so they are turned down here (numerics unchanged:
float64 comparisons still hold to ~1e-14). Simulated devices are set for the parallelism tests.
"""

import os

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Four simulated CPU devices: the training tests run data-parallel over them.
_DEVICES = "--xla_force_host_platform_device_count=4"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE + " " + _DEVICES).strip()

# With libtpu installed (the test extra installs jax[tpu] to compile the kernels for TPUs, see
# tnt_jax/aot.py), JAX would try to start a TPU runtime in every process. Where this host has
# no accelerator at all, keep JAX on the CPU (subprocesses inherit this); the compile-only TPU
# client works regardless.
_ACCELERATOR_NODES = ("/dev/accel0", "/dev/vfio/0", "/dev/nvidiactl", "/dev/kfd")
if not any(os.path.exists(node) for node in _ACCELERATOR_NODES):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
