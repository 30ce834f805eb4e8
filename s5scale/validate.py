"""Checks a resolved config against defaults.py before anything is compiled or read.

Every entry point runs it: cli.parse_flags checks the config alone (train, evaluate, generate,
tools/aot_compile.py), and `check_on_devices` checks again once the mesh's -1 sizes are filled in
from the devices. The launcher runs it on its own machine before it creates a slice:

  python -m s5scale.validate --config=configs/X.py [--config.a.b=v ...]   # exit 0 valid, 2 not
"""

import sys

from s5scale import config_schema, defaults
from s5scale.config_schema import ConfigError


def check(config) -> None:
  """Raises ConfigError listing every violation (key, value, what is allowed)."""
  found = config_schema.violations(config, defaults.CONSTRAINTS, defaults.RULES)
  if found:
    raise ConfigError("invalid config:\n  " + "\n  ".join(found))


def check_section(name: str, section) -> None:
  """One section alone, for library code handed e.g. config.data rather than the whole config:
  its keys' constraints and the rules among its own keys. Raises ConfigError like `check`."""
  prefix = f"{name}."
  constraints = {k: c for k, c in defaults.CONSTRAINTS.items() if k.startswith(prefix)}
  rules = [rule for rule in defaults.RULES if all(k.startswith(prefix) for k in rule.keys)]
  found = config_schema.violations({name: section}, constraints, rules)
  if found:
    raise ConfigError("invalid config:\n  " + "\n  ".join(found))


def check_on_devices(config, devices, process_count: int) -> None:
  """The mesh rules again with -1 filled in from `devices`, and the batch split over processes."""
  from s5scale import parallel  # pylint: disable=g-import-not-at-top  (jax: only when needed)
  try:
    ici, dcn = parallel.mesh_shape(config.mesh, len(devices), parallel.num_slices(devices))
  except parallel.MeshConfigError as error:
    raise ConfigError(str(error)) from None
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    for axis, ici_size, dcn_size in zip(parallel.MESH_AXES, ici, dcn):
      resolved.mesh[axis], resolved.mesh[f"dcn_{axis}"] = ici_size, dcn_size
  found = config_schema.violations(resolved, defaults.CONSTRAINTS, defaults.RULES)
  if config.data.batch_size % process_count:
    found.append(f"data.batch_size={config.data.batch_size}: need it divisible by the process "
                 f"count ({process_count})")
  if config.model.scan_impl == "pallas" and devices[0].platform != "tpu":
    found.append(f"model.scan_impl='pallas': a TPU kernel, but the devices are "
                 f"{devices[0].platform}; use 'auto' (Pallas on TPU, chunked elsewhere)")
  if found:
    raise ConfigError(f"invalid config on {len(devices)} devices (mesh sizes of -1 filled in: "
                      f"ICI {dict(zip(parallel.MESH_AXES, ici))}, DCN "
                      f"{dict(zip(parallel.MESH_AXES, dcn))}):\n  " + "\n  ".join(found))


def allowed(key: str) -> str:
  constraint = defaults.CONSTRAINTS.get(key)
  return constraint.allowed if constraint else "no constraint declared"


def main(argv) -> int:
  del argv  # cli.parse_flags has already validated the config, or exited 2
  return 0


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from s5scale import cli  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                  lock_config=True)
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
