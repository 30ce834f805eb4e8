"""Following a training workdir's checkpoints from another job: list, pin, skip, retry, watch.

The eval job and sample scoring read checkpoints while the trainer writes and rotates them. The
follower lists the complete steps (retrying a listing that fails mid-deletion), pins the steps it
is about to read so the trainer's rotation keeps them (checkpoint.PinnedByEvalJobs), skips a
step that rotation deleted anyway or that is incomplete or unreadable (the caller records the
skip; the job goes on), and with `watch` polls until the trainer's final step is done.

  follower = CheckpointFollower(workdir, "heldout", config, watch=True)
  for step, variables in follower.checkpoints(abstract, done=..., on_skip=...):
    ...
"""

import threading
import time
from typing import Callable, Iterator

from absl import logging

from s5scale import checkpoint, inference, storage


class StepSkipped(Exception):
  """A step the trainer deleted, or had not finished, while it was read: skipped, not fatal."""


class CheckpointFollower:
  """The steps of one workdir that a job has not done yet, restored one by one.

  name: the job's pin name (one pin file per job kind, e.g. the eval split).
  only_step: that step alone (CheckpointError if it is not there or cannot be read).
  stop: once set, the follower ends at its next wait (the job was asked to stop).
  """

  def __init__(self, workdir: str, name: str, config, *, only_step: int | None = None,
               watch: bool = False, poll_seconds: float = 10.0,
               stop: threading.Event | None = None):
    self.workdir, self.name, self.config_dict = workdir, name, config.to_dict()
    self.only_step, self.watch, self.poll_seconds = only_step, watch, poll_seconds
    self.stop = stop or threading.Event()
    self.final_step = config.train.num_steps
    self.missed = MissedSteps(config.checkpoint)

  def checkpoints(self, abstract: dict, done: Callable[[], set[int]],
                  on_skip: Callable[[int, str], None]) -> Iterator[tuple[int, dict]]:
    """Yields (step, variables restored onto `abstract`) for every step not in done(), oldest
    first; calls on_skip(step, why) for a step it cannot read. Without `watch` it ends after one
    pass; with it, once done() holds the trainer's final step."""
    manager = self._open()
    if manager is None:
      return
    trainer_config = None
    while True:
      available = list_steps(manager)
      pending = self._pending(available, done())
      for index, step in enumerate(pending):
        checkpoint.pin_steps(self.workdir, self.name, pending[index:])
        try:
          variables, trainer_config = read_step(manager, step, abstract, self.config_dict)
        except StepSkipped as skip:
          on_skip(step, str(skip))
          if self.only_step is not None:
            raise checkpoint.CheckpointError(f"checkpoint step {step} skipped: {skip}") from None
          continue
        finally:
          if step == pending[-1]:
            checkpoint.pin_steps(self.workdir, self.name, [])
        yield step, variables
      finished = done()
      if self.watch:
        self.missed.update(available, finished, trainer_config)
      if not self.watch or self.final_step in finished:
        if not (pending or self.watch) and self.only_step is None:
          logging.info("every checkpoint in %s already has a %r record", manager.directory,
                       self.name)
        return
      if self.stop.wait(self.poll_seconds):
        return

  def _open(self):
    """The trainer's checkpoints, read-only; None if stopped before the trainer wrote any."""
    directory = checkpoint.checkpoint_dir(self.workdir)
    while self.watch and not storage.path(directory).is_dir():
      if self.stop.wait(self.poll_seconds):  # started before the training job wrote anything
        return None
    if not storage.path(directory).is_dir():
      raise checkpoint.CheckpointError(f"no checkpoints in {self.workdir}")
    return checkpoint.open_readonly(self.workdir)

  def _pending(self, available: list[int], done: set[int]) -> list[int]:
    if self.only_step is not None:
      if self.only_step not in available:
        raise checkpoint.CheckpointError(f"--step={self.only_step}: no complete checkpoint; "
                                         f"available steps {sorted(available)}")
      return [self.only_step]
    return [s for s in sorted(available) if s not in done]


def list_steps(manager, attempts: int = 3) -> list[int]:
  """The complete steps on disk; a listing that fails because the trainer is deleting a step is
  retried, and after `attempts` this poll sees none."""
  for attempt in range(attempts):
    try:
      manager.reload()
      return sorted(manager.all_steps())
    # orbax raises many types for a step that vanishes while it lists.
    except Exception as error:  # pylint: disable=broad-except
      logging.warning("listing %s failed while the trainer changed it (%s: %s); attempt %d of %d",
                      manager.directory, type(error).__name__, str(error)[:200], attempt + 1,
                      attempts)
      time.sleep(1.0)
  return []


def why_unusable(manager, step: int, error: Exception | None = None) -> str | None:
  missing = checkpoint.missing_parts(manager.directory, step)
  if missing == ["the whole step"]:
    return "deleted by checkpoint rotation after this job listed it"
  if missing:
    return f"incomplete: {', '.join(missing)} missing"
  if error is not None:
    return f"unreadable: {type(error).__name__}: {str(error)[:300]}"
  return None


def wait_until_complete(manager, step: int, attempts: int = 5, pause_s: float = 0.5) -> None:
  """StepSkipped unless `step` is (or soon becomes) complete on disk. A step just renamed into
  place can still be getting its step metadata; one being deleted loses its parts one by one."""
  for _ in range(attempts):
    why = why_unusable(manager, step)
    if why is None:
      return
    if why.startswith("deleted"):
      break
    time.sleep(pause_s)
  raise StepSkipped(why)


def read_step(manager, step: int, abstract: dict, config_dict: dict) -> tuple[dict, dict]:
  """(the step's variables, the trainer's saved config); StepSkipped if the step is gone,
  incomplete or unreadable. An incompatible architecture is CheckpointError (exit 2)."""
  wait_until_complete(manager, step)
  try:
    saved = checkpoint.saved_config(manager, step)
  except Exception as error:  # pylint: disable=broad-except
    raise StepSkipped(why_unusable(manager, step, error)) from None
  wait_until_complete(manager, step)  # again: a failed restore mid-deletion is noisy in orbax
  try:
    return inference.restore_variables(manager, step, abstract, config_dict, saved), saved
  except checkpoint.CheckpointError:
    raise  # an incompatible architecture: the job's config is wrong, not the step
  except Exception as error:  # pylint: disable=broad-except
    raise StepSkipped(why_unusable(manager, step, error)) from None


class MissedSteps:
  """Counts saved steps that rotation deleted before this --watch job saw them."""

  def __init__(self, checkpoint_config):
    self.every_steps, self.keep = checkpoint_config.every_steps, checkpoint_config.keep
    self.seen, self.reported = set(), 0

  def update(self, available: list[int], done: set[int], trainer_config: dict | None) -> None:
    if trainer_config:  # the trainer's own values, if its command line changed them
      self.every_steps = trainer_config["checkpoint"]["every_steps"]
      self.keep = trainer_config["checkpoint"]["keep"]
    self.seen |= set(available)
    newest = max(self.seen, default=0)
    saved = set(range(self.every_steps, newest + 1, self.every_steps))
    missed = sorted(saved - self.seen - done)
    if len(missed) > self.reported:
      self.reported = len(missed)
      logging.warning(
          "missed %d checkpoint step(s) so far (the latest: %s): the trainer's rotation deleted "
          "them before this job saw them. Raise checkpoint.keep (now %d) in the trainer's "
          "config, or evaluate faster (--poll_seconds, eval.max_batches).", len(missed),
          missed[-5:], self.keep)
