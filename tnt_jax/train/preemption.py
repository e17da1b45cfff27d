"""A preemption notice (SIGTERM) as a flag the train loop reads between steps.

    preempt = install_sigterm_handler()
    for step in range(start, num_steps):
      state = train_step(state, batch)
      checkpointer.save(step, state, data_iter.get_state(), metadata)
      if preempt.should_stop(step):
        checkpointer.save(step, state, data_iter.get_state(), metadata, force=True)
        checkpointer.wait()
        break
    checkpointer.close()
    preempt.close()

The handler only sets a flag: saving inside a signal handler would run orbax and JAX re-entrantly,
in the middle of whatever the main thread was doing (a dispatch, a host transfer, a save).

Several hosts must agree on the step at which they all save, or the save's barriers hang. With
more than one process and JAX's preemption service on (the default after
`jax.distributed.initialize`), JAX owns SIGTERM and `should_stop` asks
`multihost_utils.reached_preemption_sync_point`, which returns True on every host at the same
step. With the service off, each host's flag is all-gathered every step (one tiny host-level
collective; correct, not free). One process: the local flag, no communication.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionSignal:
  """Sets `requested` on SIGTERM (or the given signals); `close()` restores the old handlers."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous = {}
    self._multi_host = jax.process_count() > 1
    # JAX's preemption service installs its own SIGTERM notifier; replacing it would break the
    # cross-host agreement, so leave it in place and ask the service instead.
    self._use_jax_service = self._multi_host and jax.config.jax_enable_preemption_service
    if not self._use_jax_service:
      for signum in signals:
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._event.set()

  @property
  def requested(self) -> bool:
    """True once this process received the signal."""
    return self._event.is_set()

  def should_stop(self, step: int) -> bool:
    """True when every process should save `step` now and exit; call it at every step."""
    if self._use_jax_service:
      return multihost_utils.reached_preemption_sync_point(step)
    if self._multi_host:
      flags = multihost_utils.process_allgather(jax.numpy.asarray(self.requested))
      return bool(flags.any())
    return self.requested

  def close(self):
    """Puts back the handlers that were installed before; idempotent."""
    for signum, previous in self._previous.items():
      # None: the old handler was not installed from Python; the default is the honest fallback.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def install_sigterm_handler() -> PreemptionSignal:
  """Catches SIGTERM from now on (call from the main thread); see `PreemptionSignal`."""
  return PreemptionSignal((signal.SIGTERM,))
