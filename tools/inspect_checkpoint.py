"""Inspect a workdir's checkpoints, and export one step's parameters.

  python tools/inspect_checkpoint.py WORKDIR [--step=N] [--config=configs/X.py] \
      [--export=params.npz | --export=params.safetensors]

Prints every step with its save time, mesh and process count (a damaged step is named, with
the reason, and skipped); then, for --step (default: the newest readable step), the saved config
(or only its differences from --config) and the parameter tree with shapes, dtypes and counts.
--export writes that step's parameters, gathered on this host, keyed "blocks/ssm/B" etc.
(.safetensors needs `pip install safetensors`). Runs on one CPU whatever mesh trained the run.
Exit 2: no checkpoint, a missing or damaged --step, or a bad --export name.
"""

import json
import math
import os
import runpy
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from s5scale import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from s5scale import checkpoint_info  # pylint: disable=g-import-not-at-top,wrong-import-position
from s5scale import storage  # pylint: disable=g-import-not-at-top,wrong-import-position

_STEP = flags.DEFINE_integer("step", None, "Step to describe/export (default: newest readable).")
_CONFIG = flags.DEFINE_string("config", None, "Config file: print only the saved config's "
                              "differences from it.")
_EXPORT = flags.DEFINE_string("export", None, "Write the step's parameters to FILE.npz or "
                              "FILE.safetensors.")


def _fail(message: str):
  # orbax's worker threads may still be printing tracebacks about the damaged step: one write,
  # starting on a fresh line, keeps this message whole, and exiting at once stops later noise.
  sys.stdout.flush()
  sys.stderr.write(f"\nerror: {message}\n")
  sys.stderr.flush()
  os._exit(2)


def _print_steps(infos) -> None:
  print(f"{'step':>8}  {'saved (UTC)':<26} {'mesh':<28} processes")
  for info in infos:
    if info.damaged:
      print(f"{info.step:>8}  DAMAGED ({info.directory}): {info.damaged}")
      continue
    meta = info.meta
    mesh = " ".join(f"{axis}={size}" for axis, size in meta.get("mesh", {}).items())
    print(f"{info.step:>8}  {meta.get('time', '?')[:26]:<26} {mesh:<28} "
          f"{meta.get('process_count', '?')}")


def _print_config(workdir: str, step: int) -> None:
  saved = checkpoint.saved_config(checkpoint.open_readonly(workdir), step)
  if not _CONFIG.value:
    print(f"\nconfig saved with step {step}:")
    print(json.dumps(saved, indent=2, sort_keys=True))
    return
  other = runpy.run_path(_CONFIG.value)["get_config"]().to_dict()
  differences = checkpoint_info.config_difference(saved, other)
  print(f"\nconfig of step {step} vs {_CONFIG.value}: "
        f"{len(differences) or 'no'} difference{'s' if len(differences) != 1 else ''}")
  for line in differences:
    print(f"  {line}")


def _print_params(workdir: str, step: int) -> None:
  shapes = checkpoint_info.param_shapes(workdir, step)
  total = 0
  print(f"\nparameters of step {step}:")
  for name, (shape, dtype) in sorted(shapes.items()):
    count = math.prod(shape)
    total += count
    print(f"  {name:<44} {str(shape):<20} {dtype:<8} {count:>12,}")
  print(f"  {'total':<44} {'':<20} {'':<8} {total:>12,}")


def main(argv):
  if len(argv) != 2:
    _fail("usage: inspect_checkpoint.py WORKDIR [--step=N] [--config=FILE] [--export=FILE]")
  workdir = argv[1]
  if not storage.path(checkpoint.checkpoint_dir(workdir)).is_dir() and not storage.path(workdir).is_dir():
    _fail(f"{workdir!r} is not a workdir or checkpoint directory")
  infos = checkpoint_info.list_steps(workdir)
  if not infos:
    _fail(f"no checkpoints in {workdir}")
  _print_steps(infos)
  readable = [info.step for info in infos if not info.damaged]
  step = _STEP.value if _STEP.value is not None else (readable[-1] if readable else None)
  if step is None:
    _fail(f"every checkpoint in {workdir} is damaged")
  if step not in readable:
    _fail(f"step {step} is not a readable checkpoint of {workdir} (readable: {readable})")
  _print_config(workdir, step)
  _print_params(workdir, step)
  if _EXPORT.value:
    try:
      arrays = checkpoint_info.params_as_numpy(workdir, step)
    except Exception as error:  # orbax raises many types for damaged files; all mean "unusable"
      _fail(f"step {step} of {workdir} is damaged, its parameters cannot be read "
            f"({type(error).__name__}: {str(error)[:300]})")
    try:
      checkpoint_info.export_params(arrays, _EXPORT.value)
    except checkpoint.CheckpointError as error:
      _fail(str(error))
    print(f"\nexported {len(arrays)} arrays of step {step} to {_EXPORT.value}")


if __name__ == "__main__":
  app.run(main)
