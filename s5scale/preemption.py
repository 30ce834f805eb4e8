"""SIGTERM → a clean stop at a step every process agrees on.

docs/design.md, "Checkpoints and preemption", gives the contract.

Kept free of heavy imports so the train program (s5scale/train.py) can install the handler
before importing JAX: a SIGTERM during start-up, compilation or restore is then remembered
instead of killing the process.
"""

import os
import signal
import time


class PreemptionWatcher:
  """Tells every process, at the same step, that the job is being preempted.

  With a jax.distributed client, processes agree through JAX's preemption sync point: the client
  installs its own SIGTERM notifier, which replaces this handler. Without one, this handler decides.
  `connect()` picks between the two once jax.distributed is (or is known not to be) up.
  """

  def __init__(self):
    self.signalled_at = None
    self.synced = None  # None until connect(): then True (sync point) or False (own handler)
    signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.signalled_at = time.time()

  @property
  def signalled(self) -> bool:
    return self.signalled_at is not None

  def connect(self, launched_processes: int = 1) -> None:
    """Call right after jax.distributed.initialize() would have run.

    Never lets a SIGTERM go unanswered: several processes without a client have no sync point
    (reached_preemption_sync_point says False forever), so each falls back to its own signal.
    """
    import jax  # already imported by then; kept out of module import time
    from absl import logging
    self.synced = jax.distributed.is_initialized()
    processes = max(jax.process_count(), launched_processes)
    if self.synced:
      if self.signalled:  # arrived before JAX's notifier existed: hand it over
        os.kill(os.getpid(), signal.SIGTERM)
      logging.info("preemption: %d process(es) agree on the stop step through jax.distributed",
                   processes)
    elif processes > 1:
      logging.error(
          "preemption: %d processes but no jax.distributed client, so there is no preemption "
          "sync point; SIGTERM falls back to the local handler: each process stops at the first "
          "step after its own SIGTERM, and a host that gets none keeps running. Launch with "
          "launch/tpu_worker.sh (S5SCALE_DISTRIBUTED=1) or launch/local.sh.", processes)

  def reached(self, step: int) -> bool:
    if self.synced is None:
      self.connect()
    if self.synced:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signalled
