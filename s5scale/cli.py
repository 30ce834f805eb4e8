"""Command-line plumbing shared by train, evaluate and generate: flags, config checks, exit codes.

Exit codes (DESIGN.md §3): 0 finished or preempted-and-saved, 2 bad config or bad input.
"""

import os
import runpy
import sys

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from s5scale import parallel, ssm
from s5scale.nn.blocks import ACTIVATIONS, NORMS
from s5scale.nn.model import REMAT_POLICIES

EXIT_BAD_INPUT = 2

FLAGS = flags.FLAGS


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints/, tb/, metrics.jsonl, ...).")
  flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, but a bad flag or unknown config key exits 2 and lists the valid keys."""
  keys = valid_config_keys(argv)
  overridden = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  unknown = [k for k in overridden if keys and k not in keys]
  if unknown:
    print(f"error: unknown config key(s) {', '.join(unknown)}; valid --config.* keys:\n  "
          + "\n  ".join(keys), file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    # ml_collections reports an unknown override key as AttributeError/KeyError.
    print(f"error: bad flag or config override: {error}", file=sys.stderr)
    if keys:
      print("valid --config.* keys:\n  " + "\n  ".join(keys), file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def valid_config_keys(argv: list[str]) -> list[str]:
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  try:
    config = runpy.run_path(path)["get_config"]() if path else None
  except Exception:  # the config file itself is broken; absl's message already says so
    return []
  return sorted(flatten_keys(config)) if config is not None else []


def flatten_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      keys += flatten_keys(value, f"{prefix}{key}.")
    else:
      keys.append(f"{prefix}{key}")
  return keys


def choice(config, key: str, options) -> None:
  section, name = key.split(".")
  value = config[section][name]
  if value not in options:
    raise ConfigError(f"{key}={value!r} is not one of {tuple(options)}")


def check_config(config, devices, process_count: int) -> None:
  """Everything that can be checked before compiling; raises ConfigError naming the key."""
  model, data, mesh_config = config.model, config.data, config.mesh
  choice(config, "model.task", ("lm", "classify"))
  choice(config, "model.input_kind", ("tokens", "continuous"))
  choice(config, "model.activation", ACTIVATIONS)
  choice(config, "model.norm", NORMS)
  choice(config, "model.remat", tuple(REMAT_POLICIES))
  choice(config, "model.pooling", ("mean", "last"))
  choice(config, "model.scan_impl", ("default", "reference"))
  choice(config, "model.compute_dtype", ("float32", "bfloat16"))
  choice(config, "model.residual_dtype", ("float32", "bfloat16"))
  for key, value in (("model.num_layers", model.num_layers), ("model.d_model", model.d_model),
                     ("data.batch_size", data.batch_size), ("data.seq_len", data.seq_len),
                     ("train.num_steps", config.train.num_steps),
                     ("optim.grad_accum_steps", config.optim.grad_accum_steps)):
    if value <= 0:
      raise ConfigError(f"{key} must be positive, got {value}")
  try:
    ssm.validate_ssm_args(discretization=model.discretization, c_init=model.c_init,
                          dt_min=model.dt_min, dt_max=model.dt_max)
    ssm.validate_state_sizes(model.ssm_size, model.blocks, model.conj_sym)
  except ValueError as error:
    raise ConfigError(f"model: {error}") from None
  if data.task != model.task:
    raise ConfigError(f"data.task={data.task!r} must equal model.task={model.task!r}")
  try:
    ici, dcn = parallel.mesh_shape(mesh_config, len(devices), parallel.num_slices(devices))
  except parallel.MeshConfigError as error:
    raise ConfigError(str(error)) from None
  data_ways = ici[0] * ici[1] * dcn[0] * dcn[1]
  fsdp_ways = ici[1] * dcn[1]
  model_ways = ici[2] * dcn[2]
  num_states = model.ssm_size // 2 if model.conj_sym else model.ssm_size
  if model.d_model % model_ways:
    raise ConfigError(f"model.d_model={model.d_model} is not divisible by mesh.model={model_ways}")
  if num_states % model_ways:
    raise ConfigError(f"model.ssm_size={model.ssm_size} ({num_states} complex states) is not "
                      f"divisible by mesh.model={model_ways}")
  if model.d_model % fsdp_ways:
    raise ConfigError(f"model.d_model={model.d_model} is not divisible by mesh.fsdp={fsdp_ways}")
  per_update = data_ways * config.optim.grad_accum_steps
  if data.batch_size % per_update or data.batch_size % process_count:
    raise ConfigError(
        f"data.batch_size={data.batch_size} must be divisible by mesh data*fsdp ({data_ways}) × "
        f"optim.grad_accum_steps ({config.optim.grad_accum_steps}) and by the process count "
        f"({process_count})")


def fill_num_classes(config) -> None:
  """Classification: model.num_classes=0 becomes the data's label-folder count; any other value
  must equal it (a head of the wrong width would train without error, on the wrong classes)."""
  if config.model.task != "classify":
    return
  from s5scale import data  # pylint: disable=g-import-not-at-top  (grain: only when needed)
  found = data.num_classes(config.data)
  if config.model.num_classes == 0:
    config.model.num_classes = found
  elif config.model.num_classes != found:
    raise ConfigError(f"model.num_classes={config.model.num_classes} but data.source="
                      f"{config.data.source!r} has {found} label folders: "
                      f"{data.label_names(config.data)}")


def model_kwargs(model_config) -> dict:
  """S5Model fields from config.model (the S5 layer's own fields grouped in ssm_kwargs)."""
  import jax.numpy as jnp
  ssm_keys = ("ssm_size", "blocks", "conj_sym", "bidirectional", "discretization", "c_init",
              "dt_min", "dt_max", "clip_eigs", "step_rescale", "scan_impl")
  model_keys = ("task", "input_kind", "vocab_size", "num_classes", "num_layers", "d_model", "norm",
                "prenorm", "activation", "mlp_ratio", "dropout", "pooling", "scan_layers", "remat")
  kwargs = {k: model_config[k] for k in model_keys}
  kwargs["ssm_kwargs"] = {k: model_config[k] for k in ssm_keys}
  kwargs["compute_dtype"] = jnp.dtype(model_config.compute_dtype)
  kwargs["residual_dtype"] = jnp.dtype(model_config.residual_dtype)
  return kwargs


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
