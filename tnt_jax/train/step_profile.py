"""Trace a window of training steps: `--config.profile_steps=3 --config.profile_start=10`.

The trace (workdir/profile/, an .xplane.pb that TensorBoard's profile plugin, XProf or Perfetto
open) covers steps [profile_start, profile_start + profile_steps); the device is drained before
and after, so it holds those steps alone. The trainer then prints, and writes to
workdir/profile/summary.txt, where a step's time went on the first device (profiling.step_summary):
busy time against the host's wall time (a gap is the input pipeline or dispatch), the kernels by
kind (the fused memory kernels, matmuls, attention, XLA's other kernels, communication) and the
longest kernels with the HLO they come from.
"""

from __future__ import annotations

import glob
import os
import time
from typing import Callable

import jax

from tnt_jax import profiling


def check_window(config) -> None:
  """The window must lie within the run and hold no evaluation (it would be traced as a step)."""
  steps, start = config.get("profile_steps", 0), config.get("profile_start", 1)
  if steps < 0:
    raise ValueError(f"profile_steps={steps} must be >= 0 (0: no profile)")
  if not steps:
    return
  last = start + steps - 1
  if start < 1 or last > config.steps:
    raise ValueError(f"the profiled steps {start}..{last} (profile_start={start}, "
                     f"profile_steps={steps}) must lie within the run's steps 1..{config.steps}")
  evals = [s for s in range(start, last) if s % config.eval_every == 0]
  if evals:
    raise ValueError(f"the profiled steps {start}..{last} hold an evaluation after step "
                     f"{evals[0]} (eval_every={config.eval_every}); move profile_start")


class StepProfiler:
  """Call `before(step, state)` before dispatching a step and `after(step, state, hlo_text)`
  after; both do nothing outside the window, and return the seconds they spent (draining the
  device, writing and reading the trace), which the trainer leaves out of its tokens/s."""

  def __init__(self, directory: str, start: int, steps: int, log: Callable[[str], None]):
    self.directory, self.start, self.steps, self.log = directory, start, steps, log
    self.last = start + steps - 1
    self._t0 = None
    self.summary = None

  @classmethod
  def from_config(cls, config, workdir: str, first_step: int, log) -> "StepProfiler | None":
    steps, start = config.get("profile_steps", 0), config.get("profile_start", 1)
    if not steps:
      return None
    if first_step > start:
      log(f"profile: not taken (this run resumes at step {first_step}, after profile_start="
          f"{start})")
      return None
    return cls(os.path.join(workdir, "profile"), start, steps, log)

  def before(self, step: int, state) -> float:
    if step != self.start:
      return 0.0
    t = time.perf_counter()
    jax.block_until_ready(state)
    os.makedirs(self.directory, exist_ok=True)
    self._traces_before = set(self._traces())
    jax.profiler.start_trace(self.directory)
    self._t0 = time.perf_counter()
    return self._t0 - t

  def after(self, step: int, state, hlo_text: Callable[[], str]) -> float:
    if step != self.last or self._t0 is None:
      return 0.0
    jax.block_until_ready(state)
    t = time.perf_counter()
    wall_ms = (t - self._t0) * 1e3 / self.steps
    jax.profiler.stop_trace()
    new = sorted(set(self._traces()) - self._traces_before, key=os.path.getmtime)
    if not new:
      raise RuntimeError(f"the profiler wrote no .xplane.pb under {self.directory}")
    profile = jax.profiler.ProfileData.from_file(new[-1])
    summary = (f"steps {self.start}..{self.last}: {wall_ms:.2f} ms wall per step\n"
               + profiling.step_summary(profile, self.steps, hlo_text(), wall_ms=wall_ms))
    with open(os.path.join(self.directory, "summary.txt"), "w") as f:
      f.write(summary + "\n")
    self.log(f"profile of {summary}\ntrace: {new[-1]}")
    self.summary = summary
    return time.perf_counter() - t

  def _traces(self) -> list[str]:
    return glob.glob(os.path.join(self.directory, "**", "*.xplane.pb"), recursive=True)
