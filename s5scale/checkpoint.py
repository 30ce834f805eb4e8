"""Saving and restoring a run's train state with orbax (state + every process's grain iterator +
config): the trainer's side, and the reads the eval and sampling jobs build on.

Orbax writes each step to a temporary directory and renames it when complete, so a save killed
midway is never listed. A step whose files are damaged is passed over for the previous one.

The eval job reads steps that the trainer rotates out (checkpoint.keep). Once it has listed the
steps it will read, it pins them (eval/pins/<split>.json), and the trainer's orbax preservation
policy keeps pinned steps. What the pin cannot close: orbax picks the steps to delete when a save
starts and deletes them when that save is finalised, so a save already under way when the pin
appeared still deletes its condemned step. The eval job then finds the step gone or incomplete
and records a skip.
"""

import dataclasses
import datetime
import json
import time

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

import s5scale
from s5scale import defaults, storage


class CheckpointError(ValueError):
  """A checkpoint that cannot be used (maps to exit 2)."""


def checkpoint_dir(workdir: str) -> str:
  return storage.join(workdir, "checkpoints")


# An eval job killed mid-read leaves its pin behind; past this age the trainer ignores it.
PIN_TTL_S = 3600.0
# The parts of a step this code writes; each must be present for the step to be complete.
STEP_ITEMS = ("state", "config", "meta")
STEP_METADATA = "_CHECKPOINT_METADATA"


# Orbax splits the write of a replicated array among its replicas, each slicing its part on its
# device. Below this many bytes per replica the split saves nothing worth having, and every slice
# shape costs a program compiled on each device at the first save (about 5 s a process on 8 CPU
# devices), so such arrays are written whole by their first replica. The large, fsdp-sharded
# arrays of a pod run stay above it and keep the split.
MIN_BYTES_PER_REPLICA_SLICE = 1 << 20


def _use_array_handler() -> None:
  """Makes orbax write jax.Arrays as above. Orbax reads its handlers from one registry for the
  process, so this is done when a manager is made rather than on import."""
  handler = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_BYTES_PER_REPLICA_SLICE)
  # Replacing orbax's default handler is the point, so its warning about that is not wanted.
  absl_logger = logging.get_absl_logger()
  level = absl_logger.level
  absl_logger.setLevel("ERROR")
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_logger.setLevel(level)


def pins_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / "eval" / "pins"


@dataclasses.dataclass
class PinnedByEvalJobs(ocp.checkpoint_managers.PreservationPolicy):
  """Preserves the steps an eval job has pinned while it reads them (see pin_steps)."""
  workdir: str

  def pinned_steps(self) -> set[int]:
    steps = set()
    try:
      pin_files = list(pins_dir(self.workdir).glob("*.json"))
    except OSError:
      return steps
    for pin_file in pin_files:
      try:
        pin = json.loads(pin_file.read_text())
        if time.time() - pin["time"] < PIN_TTL_S:
          steps.update(int(step) for step in pin["steps"])
      except (OSError, ValueError, KeyError, TypeError):
        continue  # being rewritten or removed by its eval job right now
    return steps

  def should_preserve(self, checkpoints, *, context):
    del context
    pinned = self.pinned_steps()
    return [info.step in pinned for info in checkpoints]


def save_policy(checkpoint_config) -> ocp.checkpoint_managers.SaveDecisionPolicy:
  """When a save is due: every `every_steps` steps, or `every_minutes` after the last save.

  Orbax's time policy reads process 0's clock and hands its answer to every process through the
  jax.distributed key-value store, so all hosts decide alike. It also declines while a save is
  still being written, and says yes on the first step of a run that has no checkpoint yet.
  """
  policies = [ocp.checkpoint_managers.FixedIntervalPolicy(checkpoint_config.every_steps)]
  every_minutes = checkpoint_config.get("every_minutes", 0)
  if every_minutes:
    policies.append(ocp.checkpoint_managers.ContinuousCheckpointingPolicy(
        minimum_interval_secs=max(1, round(every_minutes * 60))))
  return ocp.checkpoint_managers.AnySavePolicy(policies)


def wait_for_every_process(name: str, timeout_s: int = 900) -> None:
  """Waits until every process has called this with `name`, at the jax.distributed coordination
  service's barrier, which is not a device collective.

  Called before the first collective (the manager's own sync): processes can reach it far apart
  (imports, data, a loaded host), and gloo, the CPU collectives, gives up when a peer is 30 s
  late, while this barrier waits timeout_s.
  """
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(name, processes=set(range(jax.process_count())),
                                        timeout=timeout_s)


def make_manager(workdir: str, checkpoint_config=None, read_only: bool = False):
  _use_array_handler()
  keep = checkpoint_config.keep if checkpoint_config else None
  keep_every = checkpoint_config.keep_every if checkpoint_config else 0
  use_async = checkpoint_config.async_save if checkpoint_config else False
  policies = [ocp.checkpoint_managers.LatestN(keep), PinnedByEvalJobs(workdir)]
  if keep_every:
    policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
  saves = checkpoint_config and checkpoint_config.get("every_steps") and not read_only
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      save_decision_policy=save_policy(checkpoint_config) if saves else None,
      enable_async_checkpointing=use_async, create=not read_only, read_only=read_only,
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def pin_steps(workdir: str, name: str, steps: list[int]) -> None:
  """Asks the trainer to keep `steps` until this eval job has read them ([]: release the pin)."""
  if jax.process_index() != 0:
    return
  pin_file = pins_dir(workdir) / f"{name}.json"
  try:
    if not steps:
      pin_file.unlink(missing_ok=True)
      return
    # The trainer never reads a half-written pin.
    pin = dict(steps=[int(s) for s in steps], time=time.time())
    storage.replace_text(pin_file, json.dumps(pin))
  except OSError as error:  # a pin only narrows the race; reading goes on without it
    logging.warning("could not write the eval pin %s: %s", pin_file, error)


def missing_parts(directory, step: int) -> list[str]:
  """What step `step` lacks on disk: [] when complete, ["the whole step"] when it is gone."""
  step_dir = epath.Path(directory) / str(step)
  if not step_dir.exists():
    return ["the whole step"]
  expected = set(STEP_ITEMS)
  try:
    expected |= set(json.loads((step_dir / STEP_METADATA).read_text())["item_handlers"])
  except (OSError, ValueError, KeyError, TypeError):
    return [STEP_METADATA]
  return sorted(item for item in expected if not (step_dir / item).exists())


def save(manager, step: int, state, data_iterator, config_dict: dict, mesh) -> None:
  """Starts an (async) save of everything a resumed run needs."""
  meta = dict(version=s5scale.__version__, step=int(step), time=datetime.datetime.now(
      datetime.timezone.utc).isoformat(), mesh=dict(mesh.shape), process_count=jax.process_count())
  items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_dict),
               meta=ocp.args.JsonSave(meta))
  if data_iterator is not None:
    items["data_iter"] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


class _FrozenIteratorState:
  """An iterator position fixed when the save is called, whenever orbax's handler reads it;
  grain's handler only calls get_state()."""

  def __init__(self, state: dict):
    self._json = json.dumps(state).encode()

  def get_state(self) -> bytes:
    return self._json


class Saver:
  """Saves from the training loop's own thread; orbax's async checkpointing writes the files.

  Orbax's save runs barriers across processes, and JAX computations with collectives must be
  dispatched from one thread in the same order on every host: a save from a second thread, while
  the loop dispatches train steps, can hang a multi-host job. So the loop calls `due` and `save`
  itself, with its current step (which also feeds orbax's reached_preemption(step) calls).

  The loop waits only for the on-device snapshot (the next step donates the live buffers) and
  orbax's blocking phase; orbax then writes and finalises the step in the background.
  """

  def __init__(self, manager):
    self.manager = manager
    # One dispatch for the whole tree (per-leaf copies cost ~0.2 ms each on a busy host).
    self._snapshot = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))

  def due(self, step: int) -> bool:
    """Whether the save policy (every_steps, every_minutes) wants `step` saved; every process
    gets the same answer and must call this at the same steps."""
    return self.manager.should_save(step)

  def save(self, step: int, state, data_iterator, config_dict: dict, mesh) -> None:
    """Starts saving `step`; waits first for the previous save, if it is still being written."""
    iterator_state = None if data_iterator is None else _FrozenIteratorState(
        data_iterator.get_state())
    save(self.manager, step, self._snapshot(state), iterator_state, config_dict, mesh)

  def wait_until_finished(self) -> None:
    """Waits until every started save is complete on disk."""
    self.manager.wait_until_finished()

  def __enter__(self):
    return self

  def __exit__(self, error_type, error, traceback) -> None:
    """Finishes the save in flight, whatever ended the loop: an abandoned orbax save leaves a tmp
    step behind and stalls the process's exit. An error in the save itself is raised unless
    another error is already on its way (then it is logged)."""
    try:
      self.wait_until_finished()
    except Exception as save_error:  # pylint: disable=broad-except
      if error is None:
        raise
      logging.error("the checkpoint save in flight failed too: %s: %s",
                    type(save_error).__name__, save_error)


def saved_config(manager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def architecture_mismatch(saved: dict, current: dict) -> list[str]:
  """model.* keys whose values differ (they change parameter shapes or meaning).

  A key the checkpoint's config lacks was added to s5scale after it was written (model.layer,
  say): the checkpoint was trained with that key's default.
  """
  saved_model = {**defaults.base_config().model.to_dict(), **saved.get("model", {})}
  current_model = current.get("model", {})
  keys = sorted(set(saved_model) | set(current_model))
  return [f"model.{k}: checkpoint={saved_model.get(k)!r} config={current_model.get(k)!r}"
          for k in keys if saved_model.get(k) != current_model.get(k)]


def check_architecture(manager, step: int, config_dict: dict, saved: dict | None = None) -> None:
  """CheckpointError if the step's model.* differs from config_dict's (`saved`: its config, when
  already read)."""
  differences = architecture_mismatch(saved or saved_config(manager, step), config_dict)
  if differences:
    raise CheckpointError(
        f"checkpoint {manager.directory}/{step} has an incompatible architecture:\n  "
        + "\n  ".join(differences))


def restore_latest(manager, abstract_state, data_iterator, config_dict: dict):
  """Restores the newest readable step onto `abstract_state`'s shardings.

  Returns (state, step), or (None, None) when there is no checkpoint. Damaged steps are skipped
  with a warning; if every step is damaged, raises CheckpointError.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    check_architecture(manager, step, config_dict)
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # orbax raises many types for damaged files; all mean "unusable"
      logging.warning("checkpoint step %d in %s is damaged (%s: %s); trying the previous one",
                      step, manager.directory, type(error).__name__, str(error)[:300])
      set_aside(manager, step)
      continue
    return restored.state, step
  if steps:
    raise CheckpointError(f"no readable checkpoint in {manager.directory} (damaged steps: {steps})")
  return None, None


def open_readonly(workdir_or_dir: str):
  """A manager that only reads: a workdir or its checkpoints/ directory."""
  directory = workdir_or_dir
  if storage.path(checkpoint_dir(workdir_or_dir)).is_dir():
    directory = checkpoint_dir(workdir_or_dir)
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))


def restore_subset(manager, step: int, abstract_subset: dict) -> dict:
  """Some top-level fields of the saved train state (e.g. params, batch_stats), placed on the
  shardings of `abstract_subset` — the mesh the checkpoint was written on does not matter."""
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract_subset)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract_subset, restore_args=restore_args, partial_restore=True)))
  return restored.state


def set_aside(manager, step: int) -> None:
  """Renames a damaged step (kept for inspection) so the resumed run can write that step again."""
  if jax.process_index() == 0:
    source = storage.path(manager.directory, str(step))
    target = source.rename(f"{source}.damaged-{int(time.time())}")
    logging.warning("moved damaged checkpoint to %s", target)
  multihost_utils.sync_global_devices(f"set_aside_{step}")
  manager.reload()


def restore_init_params(workdir_or_dir: str, abstract_params):
  """Parameters only, from another run's latest checkpoint (fine-tuning from `init_from`)."""
  manager = open_readonly(workdir_or_dir)
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"checkpoint.init_from={workdir_or_dir!r} holds no checkpoint")
  return restore_subset(manager, step, {"params": abstract_params})["params"], step


def dump_json(path: str, payload: dict) -> None:
  storage.write_json(path, payload)


RUN_STATUS = "run_status.json"


def write_run_status(workdir: str, status: str, step: int) -> None:
  """Process 0 records how the trainer ended ("finished" or "preempted") for a supervisor, which
  reads it once every process has exited; written whole or not at all."""
  if jax.process_index() != 0:
    return
  status_record = dict(status=status, step=int(step))
  storage.replace_text(epath.Path(workdir) / RUN_STATUS, json.dumps(status_record))


def clear_run_status(workdir: str) -> None:
  """At start-up: a marker left by the previous run must not describe this one if it crashes."""
  if jax.process_index() == 0:
    (epath.Path(workdir) / RUN_STATUS).unlink(missing_ok=True)
