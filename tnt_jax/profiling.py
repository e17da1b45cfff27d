"""Where a step's device time goes: compute kernels against communication (NCCL) kernels, read
from a jax.profiler trace.

    split = profile_step_split(compiled_fn, args)   # runs fn under the profiler
    split.comm_ms, split.exposed_comm_ms, split.busy_ms, split.devices

Per accelerator plane ("/device:GPU:k") the kernel events of its stream lines are merged into
intervals: `busy` is the union of all kernels, `comm` the union of the communication kernels
(names with "nccl"), and `exposed comm` the part of `comm` during which no compute kernel ran
(what overlapping could still hide is the rest). Each figure is averaged over the devices and
divided by the number of profiled steps. Timing a collective alone cannot give this: XLA fuses
and reorders collectives in the real step, and may simplify them away in a toy one.

CPU traces carry no per-kernel device events; `devices == 0` then, and the figures are 0.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import tempfile
from typing import Iterable, Sequence

import jax

COMM_MARKERS = ("nccl",)
DEVICE_PLANE_PREFIX = "/device:"


@dataclasses.dataclass(frozen=True)
class TimeSplit:
  """Milliseconds per step, averaged over the profiled devices."""
  devices: int
  busy_ms: float = 0.0          # some kernel running
  comm_ms: float = 0.0          # some communication kernel running
  exposed_comm_ms: float = 0.0  # communication running and no compute kernel

  @property
  def compute_ms(self) -> float:
    return self.busy_ms - self.exposed_comm_ms


def union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
  """Sorted, disjoint cover of [start, end) intervals."""
  merged: list[list[float]] = []
  for start, end in sorted(intervals):
    if merged and start <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], end)
    else:
      merged.append([start, end])
  return [(s, e) for s, e in merged]


def length(intervals: Sequence[tuple[float, float]]) -> float:
  return sum(e - s for s, e in intervals)


def subtract(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]
             ) -> list[tuple[float, float]]:
  """The parts of union a outside union b (both sorted and disjoint)."""
  out, j = [], 0
  for start, end in a:
    while j < len(b) and b[j][1] <= start:
      j += 1
    k, cursor = j, start
    while k < len(b) and b[k][0] < end:
      if b[k][0] > cursor:
        out.append((cursor, b[k][0]))
      cursor = max(cursor, b[k][1])
      k += 1
    if cursor < end:
      out.append((cursor, end))
  return out


def is_communication(kernel_name: str) -> bool:
  name = kernel_name.lower()
  return any(marker in name for marker in COMM_MARKERS)


def split_profile(profile, steps: int = 1, max_devices: int | None = None) -> TimeSplit:
  """TimeSplit of a jax.profiler.ProfileData holding `steps` runs of a step. max_devices: read
  only the first that many device planes (by name): walking every kernel event in Python is
  slow for a many-layer step on 8 GPUs."""
  per_device = []
  planes = sorted((p for p in profile.planes if p.name.startswith(DEVICE_PLANE_PREFIX)),
                  key=lambda p: p.name)
  for plane in planes:
    if max_devices is not None and len(per_device) >= max_devices:
      break
    comm, compute = [], []
    for line in plane.lines:
      if not line.name.lower().startswith("stream"):
        continue   # kernel timelines only (not the "XLA Ops"/"XLA Modules" summaries)
      for event in line.events:
        span = (event.start_ns, event.start_ns + event.duration_ns)
        (comm if is_communication(event.name) else compute).append(span)
    if not comm and not compute:
      continue
    comm, compute = union(comm), union(compute)
    per_device.append((length(union(comm + compute)), length(comm),
                       length(subtract(comm, compute))))
  if not per_device:
    return TimeSplit(devices=0)
  n = len(per_device)
  mean_ms = lambda i: sum(d[i] for d in per_device) / n / steps / 1e6
  return TimeSplit(devices=n, busy_ms=mean_ms(0), comm_ms=mean_ms(1),
                   exposed_comm_ms=mean_ms(2))


def kernel_milliseconds(profile, steps: int = 1) -> dict[str, tuple[int, float]]:
  """Per kernel name on the first device plane: (launches per step, milliseconds per step),
  from a jax.profiler.ProfileData holding `steps` runs of a step."""
  planes = sorted((p for p in profile.planes if p.name.startswith(DEVICE_PLANE_PREFIX)),
                  key=lambda p: p.name)
  totals: dict[str, list] = {}
  for line in (planes[0].lines if planes else ()):
    if not line.name.lower().startswith("stream"):
      continue
    for event in line.events:
      entry = totals.setdefault(event.name, [0, 0])
      entry[0] += 1
      entry[1] += event.duration_ns
  return {name: (count // steps, ns / steps / 1e6) for name, (count, ns) in totals.items()}


# "  [ROOT] %name = <shape> <opcode>(operands), ..., metadata={op_name="..." ...}"
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_origins(hlo_text: str, kernel_names: Iterable[str]) -> dict[str, str]:
  """Where XLA's kernels come from: for each kernel name that is an instruction of the
  compiled HLO text (a fusion; GPU kernels write its dots as underscores), '<shape> <opcode>
  <op_name>' with op_name the JAX path (transforms, primitive) of its root. Names that are no
  HLO instruction (a Pallas, cuDNN or cuBLAS kernel) are left out."""
  wanted = set(kernel_names)
  origins = {}
  for line in hlo_text.splitlines():
    match = _HLO_INSTRUCTION.match(line)
    if match is None:
      continue
    name, shape, opcode = match.groups()
    kernel = name.replace(".", "_")
    if kernel in wanted and kernel not in origins:
      op_name = _OP_NAME.search(line)
      origins[kernel] = f"{shape} {opcode} {op_name.group(1) if op_name else ''}".rstrip()
  return origins


def profile_kernels(fn, args, steps: int = 1) -> dict[str, tuple[int, float]]:
  """Run fn(*args) `steps` times under the profiler (after one untraced run): the kernels'
  launches and milliseconds per run (`kernel_milliseconds`)."""
  return kernel_milliseconds(_profile(fn, args, steps), steps)


def _profile(fn, args, steps):
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        jax.block_until_ready(fn(*args))
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
      raise RuntimeError(f"the profiler wrote no .xplane.pb under {trace_dir}")
    return jax.profiler.ProfileData.from_file(paths[0])


def profile_step_split(fn, args, steps: int = 1, max_devices: int | None = None) -> TimeSplit:
  """Run fn(*args) `steps` times under the profiler (after one untraced run) and split the
  device time (see the module doc)."""
  return split_profile(_profile(fn, args, steps), steps, max_devices)


# What a GPU kernel is, from its name (first match wins). XLA's own kernels are named after HLO
# instructions (fusions, copies); library and Pallas kernels after themselves.
KERNEL_KINDS = (
    ("communication (NCCL)", COMM_MARKERS),
    ("fused memory kernels (Pallas)", ("mosaic_gpu", "chunk_memory_", "chunk_start_tiles")),
    ("attention (cuDNN)", ("cudnn", "fmha", "flash", "sdpa")),
    ("matmuls (cuBLAS, XLA's GEMM fusions)", ("gemm", "cutlass", "xmma", "cublas")),
    ("copies", ("memcpy", "memset")),
)
OTHER_KIND = "XLA's other kernels (elementwise, reductions, transposes)"


def kernel_kind(kernel_name: str) -> str:
  name = kernel_name.lower()
  for kind, markers in KERNEL_KINDS:
    if any(marker in name for marker in markers):
      return kind
  return OTHER_KIND


def step_summary(profile, steps: int, hlo_text: str = "", top: int = 12,
                 wall_ms: float | None = None) -> str:
  """A readable account of where a profiled step's device time goes: busy time (against the
  host's wall time per step, when given), the kernels' time by kind, and the `top` kernels with
  their launches per step and, for XLA's, the HLO they come from (`hlo_origins`)."""
  kernels = kernel_milliseconds(profile, steps)
  if not kernels:
    return ("no device kernels in the trace (CPU traces carry none; profile on a GPU to see "
            "the kernels)")
  split = split_profile(profile, steps, max_devices=1)
  total = sum(ms for _, ms in kernels.values())
  lines = [f"device busy {split.busy_ms:.2f} ms per step"
           + (f" of {wall_ms:.2f} ms wall ({split.busy_ms / wall_ms:.0%})" if wall_ms else "")
           + f"; kernels sum to {total:.2f} ms"]
  by_kind: dict[str, float] = {}
  for name, (_, ms) in kernels.items():
    kind = kernel_kind(name)
    by_kind[kind] = by_kind.get(kind, 0.0) + ms
  for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
    lines.append(f"  {ms:9.2f} ms  {ms / total:6.1%}  {kind}")
  ranked = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]
  origins = hlo_origins(hlo_text, [name for name, _ in ranked]) if hlo_text else {}
  lines.append(f"the {len(ranked)} longest kernels (ms per step, launches per step):")
  for name, (count, ms) in ranked:
    lines.append(f"  {ms:9.3f} ms  x{count:<5d} {name}")
    if name in origins:
      lines.append(f"                    {origins[name][:200]}")
  return "\n".join(lines)
