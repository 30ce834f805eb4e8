"""Command-line plumbing shared by the programs: flags, exit codes, logging, platform.

Exit codes (docs/design.md, "Exit codes"): 0 finished or preempted-and-saved, 2 bad config or
bad input. The config's constraints live beside its defaults (defaults.py) and are checked by
config_check.py; parse_flags runs that check, so no program compiles or reads anything with a
bad config.
"""

import atexit
import difflib
import os
import shutil
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from s5scale import backend, config_check, config_files, config_schema, storage
from s5scale.config_schema import ConfigError  # pylint: disable=unused-import  (re-exported)

EXIT_BAD_INPUT = 2

FLAGS = flags.FLAGS


def define_flags(config_required: bool = True, workdir: bool = True) -> None:
  """--workdir (required), and the --config flag that parse_flags defines once it knows where
  the config comes from: --config=configs/X.py, --config=WORKDIR/config.json, or, with no
  --config, the workdir's own config.json (the run as it was trained)."""
  global _CONFIG_REQUIRED
  _CONFIG_REQUIRED = config_required
  if workdir:
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints/, tb/, metrics.jsonl, ...).")
    flags.mark_flag_as_required("workdir")


_CONFIG_REQUIRED = True
CONFIG_HELP = ("Experiment config: configs/X.py or a run's config.json; default: the "
               "workdir's config.json. Override keys with --config.section.key=value.")


def parse_flags(argv: list[str], runs_jax: bool = True) -> list[str]:
  """absl parsing, then the config's constraints: a bad flag, missing config file, unknown config
  key or invalid value exits 2 with the key named. Every program parses here before it touches
  JAX, so this is also where a machine with no TPU or GPU picks the CPU
  (backend.choose_platform), once for all of them: just before main, once absl logs. A program
  that never runs JAX (validate) passes runs_jax=False and so never imports it."""
  if runs_jax:
    app.call_after_init(backend.choose_platform)
  if any(arg in ("--help", "-h", "--helpshort", "-?") for arg in argv[1:]):
    print_help_and_exit()
  config = load_config(argv)
  # The file is read here, so absl must not see --config=PATH: it would read it again as a
  # config dict, and skip registering the --config.* overrides.
  argv = without_flag(argv, "config")
  overridden = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  keys = sorted(config_schema.flat_values(config)) if config is not None else []
  if overridden and not keys:
    exit_bad_input(f"--config.{overridden[0]}: there is no config to override (give --config or "
                   "--workdir of a training run)")
  unknown = [k for k in overridden if k not in keys]
  if unknown:
    exit_bad_input("\n".join(unknown_key_message(k, keys) for k in unknown))
  try:
    if config is None:  # sample_quality --samples_dir: no config at all
      flags.DEFINE_string("config", None, CONFIG_HELP)
    else:  # registers a flag per override and parses its value now
      config_flags.DEFINE_config_dict("config", config, CONFIG_HELP, lock_config=True,
                                      sys_argv=argv)
    remaining = FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    named = [k for k in overridden if f"config.{k}=" in str(error)]
    exit_bad_input(f"bad flag or config override: {error}" + "".join(
        f"\n  {k} must be {config_check.allowed(k)}" for k in named))
  if FLAGS.config is not None:
    exit_if_invalid(FLAGS.config)
  return remaining


def load_config(argv: list[str]):
  """The config before overrides: --config=configs/X.py or a config.json, else the workdir's
  config.json; None when neither is given and the program can do without (sample_quality
  --samples_dir)."""
  path = flag_value(argv, "config")
  workdir = flag_value(argv, "workdir")
  try:
    if path is not None:
      return config_files.load_config_file(path)
    if workdir is not None and config_files.saved_run_config(workdir_path(workdir)) is not None:
      return config_files.load_run_config(workdir_path(workdir))
    if _CONFIG_REQUIRED:
      raise ConfigError("give --config=configs/X.py, or --workdir of a training run (its "
                        "config.json is then the config)")
    return None
  except ConfigError as error:
    exit_bad_input(str(error))


def flag_value(argv: list[str], name: str) -> str | None:
  """The value of --name=V or --name V in argv, before absl parses it."""
  for index, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and index + 1 < len(argv):
      return argv[index + 1]
  return None


def without_flag(argv: list[str], name: str) -> list[str]:
  """argv less --name=V, or --name and the V after it."""
  kept, skip = [], False
  for arg in argv:
    if skip or arg.startswith(f"--{name}="):
      skip = False
      continue
    skip = arg == f"--{name}"
    if not skip:
      kept.append(arg)
  return kept


def unknown_key_message(key: str, keys: list[str]) -> str:
  """Names the closest valid key, or lists the keys of the section (all keys: defaults.py)."""
  close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
  if close:
    return f"unknown config key {key}: did you mean {close[0]} ({config_check.allowed(close[0])})?"
  section = key.split(".")[0]
  in_section = [k for k in keys if k.startswith(section + ".")]
  listed = in_section or sorted({k.split(".")[0] for k in keys})
  return (f"unknown config key {key}; valid {'keys in ' + section if in_section else 'sections'}: "
          f"{', '.join(listed)} (every key, its default and what it allows: s5scale/defaults.py)")


def print_help_and_exit() -> None:
  main = sys.modules["__main__"]
  print((main.__doc__ or "").strip() + "\n")
  print(FLAGS.main_module_help())
  print(f"--config: {CONFIG_HELP}")
  sys.exit(0)


def exit_bad_input(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def exit_if_invalid(config) -> None:
  """The check every program runs on its resolved config before anything else: exit 2 with
  each violation named (key, value, what is allowed)."""
  try:
    config_check.check(config)
  except ConfigError as error:
    exit_bad_input(str(error))


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
  return workdir if storage.is_cloud(workdir) else os.path.abspath(workdir)


def setup_logging(workdir: str, name: str) -> None:
  """INFO to stderr and to WORKDIR/NAME.*.log; orbax's per-save INFO chatter is dropped.

  absl logs only to local files: for a cloud workdir the log is written to a local temporary
  folder and uploaded into the workdir when the program exits (a SIGTERM'd run exits normally).
  """
  if storage.is_cloud(workdir):
    log_dir = tempfile.mkdtemp(prefix=f"s5scale-{name}-log-")
    atexit.register(_upload_log, log_dir, workdir)
  else:
    log_dir = workdir
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as error:
      raise ConfigError(f"--workdir={workdir} cannot be used as a folder: {error}") from None
  handler = logging.get_absl_handler()
  handler.use_absl_log_file(name, log_dir)
  handler.addFilter(lambda record: record.levelno > logging.converter.STANDARD_INFO
                    or "/orbax/" not in record.pathname)
  logging.set_stderrthreshold(logging.INFO)


def _upload_log(log_dir: str, workdir: str) -> None:
  """Copies the local log files (not absl's NAME.INFO symlinks) into the cloud workdir."""
  logging.flush()
  for entry in os.scandir(log_dir):
    if entry.is_file(follow_symlinks=False):
      try:
        storage.path(workdir, entry.name).write_bytes(storage.path(entry.path).read_bytes())
      except Exception as error:  # at exit, a failed upload must not turn exit 0 into a traceback
        print(f"could not upload the log {entry.path} to {workdir}: {error}", file=sys.stderr)
  shutil.rmtree(log_dir, ignore_errors=True)
