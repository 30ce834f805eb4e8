"""The validator: a resolved config against defaults.py, before anything is compiled or read.

Every program runs it: cli.parse_flags checks the config alone (train, evaluate, generate,
sample_quality, validate, tools/aot_compile.py), and `check_on_devices` checks again once the
mesh's -1 sizes are filled in from the devices.
"""

from s5scale import config_schema, defaults
from s5scale.config_schema import ConfigError


def check(config) -> None:
  """Raises ConfigError listing every violation (key, value, what is allowed)."""
  found = config_schema.violations(config, defaults.CONSTRAINTS, defaults.RULES)
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
