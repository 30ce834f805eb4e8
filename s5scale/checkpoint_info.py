"""Reading a workdir's checkpoints without a model: steps, damage, parameter tree, export.

The boundary: checkpoint.py writes and restores a run's train state for the trainer and the
jobs that follow it; this module only inspects what is on disk, needing no config or model code.
tools/inspect_checkpoint.py is the command line; this is the library behind it. Everything goes
through orbax (checkpoint.open_readonly, checkpoint.restore_subset), and parameters are restored
onto this host's first device from the shapes and dtypes orbax recorded, so no config or model
code is needed and a checkpoint trained on any mesh exports on one CPU.
"""

import dataclasses
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp

from s5scale import checkpoint, storage

# The trainer renames a damaged step N to "N.damaged-<unix time>" (checkpoint.set_aside).
_SET_ASIDE = re.compile(r"^(\d+)\.damaged-\d+$")


@dataclasses.dataclass
class StepInfo:
  step: int
  meta: dict | None = None        # time, mesh, process_count, version (checkpoint.save)
  damaged: str | None = None      # why the step cannot be used, None when it reads
  directory: str = ""


def state_metadata(manager, step: int) -> dict:
  """The saved train state's tree, each array leaf an orbax ArrayMetadata (shape, dtype)."""
  directory = storage.path(manager.directory, str(step), "state")
  return ocp.StandardCheckpointer().metadata(directory).item_metadata.tree


def list_steps(workdir: str) -> list[StepInfo]:
  """Every step of the workdir, oldest first: readable ones with their meta, damaged ones (and
  those the trainer set aside) with the reason. Never raises for a damaged step."""
  manager = checkpoint.open_readonly(workdir)
  infos = []
  for step in manager.all_steps():
    info = StepInfo(step, directory=storage.join(manager.directory, str(step)))
    try:
      info.meta = manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
      _check_arrays(state_metadata(manager, step), info.directory)
    except Exception as error:  # orbax raises many types for damaged files; all mean "unusable"
      info.damaged = f"{type(error).__name__}: {str(error)[:200]}"
    infos.append(info)
  for path in storage.path(manager.directory).glob("*.damaged-*"):
    if match := _SET_ASIDE.match(path.name):
      infos.append(StepInfo(int(match.group(1)), damaged="set aside by the trainer as damaged",
                            directory=os.fspath(path)))
  return sorted(infos, key=lambda info: (info.step, info.damaged is not None))


def _check_arrays(tree: dict, directory: str) -> None:
  """Raises when the state's array store is missing: metadata alone can outlive the data."""
  if not any(isinstance(leaf, ocp.metadata.ArrayMetadata) for leaf in jax.tree.leaves(tree)):
    raise ValueError(f"no arrays recorded in {directory}/state")
  if not storage.path(directory, "state").is_dir():
    raise FileNotFoundError(f"{directory}/state is missing")


def flatten(tree, prefix: str = "") -> dict:
  """Nested dicts -> {"a/b/c": leaf}; empty subtrees and None leaves are dropped."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, dict):
      flat.update(flatten(value, name))
    elif value is not None:
      flat[name] = value
  return flat


def config_difference(saved: dict, other: dict) -> list[str]:
  """'key: saved=... other=...' for every flattened config key whose values differ."""
  saved_flat, other_flat = flatten(saved), flatten(other)
  return [f"{key.replace('/', '.')}: checkpoint={saved_flat.get(key)!r} "
          f"config={other_flat.get(key)!r}"
          for key in sorted(set(saved_flat) | set(other_flat))
          if saved_flat.get(key) != other_flat.get(key)]


def param_shapes(workdir: str, step: int) -> dict:
  """{"blocks/ssm/B": (shape, dtype name)} of the saved parameters, read from metadata only."""
  manager = checkpoint.open_readonly(workdir)
  params = state_metadata(manager, step)["params"]
  return {name: (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for name, leaf in flatten(params).items()}


def params_as_numpy(workdir: str, step: int) -> dict:
  """The saved parameters of `step` as host NumPy arrays, {"blocks/ssm/B": array}."""
  manager = checkpoint.open_readonly(workdir)
  params_metadata = state_metadata(manager, step)["params"]
  device = jax.local_devices()[0]
  abstract = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                        sharding=jax.sharding.SingleDeviceSharding(device)),
      params_metadata, is_leaf=lambda leaf: isinstance(leaf, ocp.metadata.ArrayMetadata))
  params = checkpoint.restore_subset(manager, step, {"params": abstract})["params"]
  return {name: np.asarray(jax.device_get(value)) for name, value in flatten(params).items()}


def export_params(arrays: dict, path: str) -> None:
  """Writes {name: array} to .npz (NumPy) or .safetensors (needs the safetensors package)."""
  if path.endswith(".npz"):
    np.savez(path, **arrays)
  elif path.endswith(".safetensors"):
    try:
      from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise checkpoint.CheckpointError("--export=*.safetensors needs the safetensors package "
                                       "(pip install safetensors)") from None
    safetensors_numpy.save_file({name: np.ascontiguousarray(a) for name, a in arrays.items()},
                                path)
  else:
    raise checkpoint.CheckpointError(f"--export={path!r}: the file must end in .npz or "
                                     ".safetensors")
