"""Bitwise-reproducible runs on GPU: `config.deterministic=True`.

On a GPU the same command can train to different losses: XLA's scatter-add (the embedding
gradient) and some reductions use atomics, and autotuning may pick a different GEMM kernel in
each compilation. Measured on an H100 (docs/train_h100.md), the small TNT LM's eval loss at step
100 spread by 0.094 nats between two runs of one command, more than many differences a
researcher wants to read. XLA's switches for this are process flags read when the backend
starts, so they must be in XLA_FLAGS before JAX first touches a device:

    python -m experiments.train --config ... --config.deterministic=True   # sets them itself

Anything else (a notebook, another launcher) sets them first with `set_xla_flags()` or exports
XLA_FLAGS; the trainer checks they are in effect and refuses to start otherwise. CPU and TPU runs
are deterministic already; the flags are harmless there. The fused Pallas kernels use no atomics,
so they need no switch.
"""

from __future__ import annotations

import os

from jax._src import xla_bridge

# Deterministic scatter and reductions; autotuning off, so every compilation of a program picks
# the same (heuristic) kernels.
DETERMINISTIC_XLA_FLAGS = ("--xla_gpu_deterministic_ops=true", "--xla_gpu_autotune_level=0")


def missing_flags(environ=os.environ) -> list[str]:
  present = environ.get("XLA_FLAGS", "").split()
  return [flag for flag in DETERMINISTIC_XLA_FLAGS if flag not in present]


def set_xla_flags(environ=os.environ) -> None:
  """Add the deterministic flags to XLA_FLAGS. Only effective before the backend starts; raises
  if it already has (the flags would be silently ignored)."""
  missing = missing_flags(environ)
  if not missing:
    return
  if xla_bridge.backends_are_initialized():
    raise RuntimeError(_too_late(missing))
  environ["XLA_FLAGS"] = " ".join(filter(None, [environ.get("XLA_FLAGS", "")] + missing))


def check(deterministic: bool, environ=os.environ) -> None:
  """For the trainer: a run asking for determinism must have the flags in effect."""
  if not deterministic:
    return
  missing = missing_flags(environ)
  if missing and xla_bridge.backends_are_initialized():
    raise ValueError(_too_late(missing))
  set_xla_flags(environ)     # not started yet: still in time


def _too_late(missing: list[str]) -> str:
  return (f"config.deterministic=True needs XLA_FLAGS to contain {' '.join(missing)} before JAX "
          "starts its backend, and it has started already: run through experiments/train.py "
          "(which sets them), call tnt_jax.train.determinism.set_xla_flags() before any JAX "
          f"computation, or export XLA_FLAGS=\"{' '.join(DETERMINISTIC_XLA_FLAGS)}\"")
