"""SIGTERM → a clean stop at a step every process agrees on (DESIGN.md §5).

Kept free of heavy imports so train.py can install the handler before importing JAX: a SIGTERM
during start-up, compilation or restore is then remembered instead of killing the process.
"""

import signal
import time


class PreemptionWatcher:
  """Tells every process, at the same step, that the job is being preempted.

  Several processes agree through JAX's preemption sync point (jax.distributed installs its own
  SIGTERM notifier); a single process relies on this handler.
  """

  def __init__(self):
    self.signalled_at = None
    signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.signalled_at = time.time()

  @property
  def signalled(self) -> bool:
    return self.signalled_at is not None

  def reached(self, step: int) -> bool:
    import jax  # already imported by then; kept out of module import time
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signalled
