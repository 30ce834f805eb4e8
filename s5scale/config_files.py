"""Where a run's config comes from: an experiment file (configs/*.py), or a workdir's config.json.

A workdir remembers its run: evaluate, generate and sample_quality started with `--workdir` alone
read WORKDIR/config.json, the trainer's resolved config, so no training override has to be typed
again. A saved config is read over today's defaults, so a key added since the run keeps its
default.
"""

import os
import runpy

import ml_collections

from s5scale import defaults, storage
from s5scale.config_schema import ConfigError

RUN_CONFIG = "config.json"


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """configs/X.py (its get_config()) or a saved config.json; ConfigError naming the path when it
  is missing or is not a config."""
  if not storage.path(path).is_file():
    raise ConfigError(f"--config={path}: no such file (a relative path is read from "
                      f"{os.getcwd()})")
  if path.endswith(".json"):
    return _over_defaults(_read_json(path))
  try:
    get_config = runpy.run_path(path)["get_config"]
  except KeyError:
    raise ConfigError(f"--config={path}: the file defines no get_config()") from None
  return get_config()


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json over today's defaults; ConfigError when the workdir has none."""
  path = storage.join(workdir, RUN_CONFIG)
  if not storage.path(path).is_file():
    raise ConfigError(f"{path} does not exist: {workdir} is not a training workdir (give "
                      "--config=configs/X.py)")
  return _over_defaults(_read_json(path))


def saved_run_config(workdir: str) -> dict | None:
  """The workdir's config.json as written, or None before the first run wrote one."""
  path = storage.join(workdir, RUN_CONFIG)
  return _read_json(path) if storage.path(path).is_file() else None


def _read_json(path: str) -> dict:
  try:
    return storage.read_json(path)
  except (OSError, ValueError) as error:
    raise ConfigError(f"{path} is not a readable config: {error}") from None


def _over_defaults(saved: dict) -> ml_collections.ConfigDict:
  config = defaults.base_config()
  for section, values in saved.items():
    if section in config and isinstance(values, dict):
      config[section].update({k: v for k, v in values.items() if k in config[section]})
  return config
