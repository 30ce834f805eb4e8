"""Command-line plumbing shared by the programs: flags, exit codes, logging, platform.

Exit codes (docs/design.md, "Exit codes"): 0 finished or preempted-and-saved, 2 bad config or
bad input. The config's constraints live beside its defaults (defaults.py) and are checked by
config_check.py; parse_flags runs that check, so no program compiles or reads anything with a
bad config.
"""

import os
import runpy
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from s5scale import backend, config_check, config_schema
from s5scale.config_schema import ConfigError  # pylint: disable=unused-import  (re-exported)

EXIT_BAD_INPUT = 2

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints/, tb/, metrics.jsonl, ...).")
  flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, then the config's constraints: a bad flag, unknown config key or invalid value
  exits 2 (an unknown key lists the valid keys and what each allows). Every entry point parses
  here before it touches JAX, so this is also where a machine with no TPU or GPU picks the CPU
  (backend.choose_platform), once for all of them: just before main, once absl logs."""
  app.call_after_init(backend.choose_platform)
  keys = valid_config_keys(argv)
  overridden = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  unknown = [k for k in overridden if keys and k not in keys]
  if unknown:
    print(f"error: unknown config key(s) {', '.join(unknown)}; valid --config.* keys:\n  "
          + "\n  ".join(f"{k}: {config_check.allowed(k)}" for k in keys), file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  try:
    remaining = FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    # ml_collections reports an unknown override key as AttributeError/KeyError.
    print(f"error: bad flag or config override: {error}", file=sys.stderr)
    named = [k for k in overridden if f"config.{k}=" in str(error)]
    if named:  # a value of the wrong type: say what that key allows
      print("\n".join(f"  {k} must be {config_check.allowed(k)}" for k in named), file=sys.stderr)
    elif keys:
      print("valid --config.* keys:\n  " + "\n  ".join(keys), file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  exit_if_invalid(FLAGS.config)
  return remaining


def exit_if_invalid(config) -> None:
  """The check every entry point runs on its resolved config before anything else: exit 2 with
  each violation named (key, value, what is allowed). An entry point whose --config is optional
  (sample_quality --samples_dir) has none to check here."""
  if config is None:
    return
  try:
    config_check.check(config)
  except ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def valid_config_keys(argv: list[str]) -> list[str]:
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  try:
    config = runpy.run_path(path)["get_config"]() if path else None
  except Exception:  # the config file itself is broken; absl's message already says so
    return []
  return sorted(config_schema.flat_values(config)) if config is not None else []


def exit_code(program, *args) -> int:
  """program(*args)'s exit code; a bad config, bad data or unusable checkpoint is logged with its
  message (no traceback) and exits 2."""
  from s5scale import checkpoint, data  # pylint: disable=g-import-not-at-top  (jax, grain)
  try:
    return program(*args)
  except (ConfigError, data.DataError, checkpoint.CheckpointError) as error:
    logging.error("%s: %s", type(error).__name__, error)
    return EXIT_BAD_INPUT


def workdir_path(workdir: str) -> str:
  """Absolute local path (orbax requires one); cloud paths such as gs://... pass unchanged."""
  return workdir if "://" in workdir else os.path.abspath(workdir)


def setup_logging(workdir: str, name: str) -> None:
  """INFO to stderr and to WORKDIR/NAME.*.log; orbax's per-save INFO chatter is dropped."""
  os.makedirs(workdir, exist_ok=True)
  handler = logging.get_absl_handler()
  handler.use_absl_log_file(name, workdir)
  handler.addFilter(lambda record: record.levelno > logging.converter.STANDARD_INFO
                    or "/orbax/" not in record.pathname)
  logging.set_stderrthreshold(logging.INFO)
