"""What a run needs, checked before step 1 and before anything is written to its workdir.

A run refused here exits 2 with the key and the fix named, and leaves the workdir as it was: no
log, no config.json, no checkpoint. (The config's own constraints are checked earlier still, at
flag parsing: config_check.py.)
"""

import os

from s5scale import checkpoint, config_files, data, storage
from s5scale.config_schema import ConfigError

# data.* keys that decide which examples of a source are held out. Resuming with other values
# would train on examples the run's eval records held out, and score ones it trained on.
SPLIT_KEYS = ("heldout_fraction", "heldout_source")


def check_workdir(workdir: str) -> None:
  """The workdir is a folder this process can create or write (cloud paths are not checked)."""
  if storage.is_cloud(workdir):
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is a file, not a folder")
  existing = workdir
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir={workdir}: {existing} is not a writable folder")


def check_heldout(config) -> None:
  """Every held-out split that an eval will read holds at least one example."""
  if not config.eval.every_steps:
    return
  for split in data.heldout_splits(config.data):
    try:
      data.make_iterator(config.data, split, num_epochs=1)
    except data.DataError as error:
      raise ConfigError(f"eval.every_steps={config.eval.every_steps} evaluates the {split} "
                        f"split, but {error}. Raise data.heldout_fraction, name held-out data "
                        "with data.heldout_source, or set eval.every_steps=0.") from None


def check_resume(config, workdir: str) -> None:
  """A workdir with a run in it is resumed only by the same model on the same split."""
  saved = config_files.saved_run_config(workdir)
  if saved is None or not storage.path(checkpoint.checkpoint_dir(workdir)).is_dir():
    return
  differences = checkpoint.architecture_mismatch(saved, config.to_dict())
  if differences:
    raise checkpoint.CheckpointError(
        f"{workdir} holds a run of another architecture; resume it with its own model.* keys "
        "or use a new --workdir:\n  " + "\n  ".join(differences))
  saved_data = saved.get("data", {})
  changed = [f"data.{key}: this workdir's run has {saved_data[key]!r}, now {config.data[key]!r}"
             for key in SPLIT_KEYS
             if key in saved_data and key in config.data and saved_data[key] != config.data[key]]
  # Carried state adds the layers' states to the train state and gives the data iterator another
  # state: either way round, the checkpoint would not restore (and would be set aside as damaged).
  if saved_data.get("carry_state", False) != config.data.get("carry_state", False):
    raise ConfigError(f"data.carry_state: this workdir's run has "
                      f"{saved_data.get('carry_state', False)!r}, now {config.data.carry_state!r}; "
                      "resume it with the run's value or use a new --workdir")
  if changed:
    raise ConfigError(f"{workdir} holds a run with another held-out split; resume it with the "
                      "run's keys or use a new --workdir:\n  " + "\n  ".join(changed))
