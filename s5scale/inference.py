"""A trained model and its variables, restored from a workdir for inference.

The one path by which generate, the eval job, sample scoring, the clip scorer and tools read a
checkpoint's parameters and BatchNorm statistics. They are restored onto this job's own mesh,
so one CPU device can use a checkpoint trained on many.

  restored = restore_model(workdir)                  # config.json, latest step, 1-host mesh
  restored.model.apply(restored.variables, inputs)
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import ml_collections

from s5scale import checkpoint, config_files, data, parallel
from s5scale.nn.model import S5Model


class RestoredModel(NamedTuple):
  model: S5Model
  variables: dict      # {"params": ..., "batch_stats": ...} (no batch_stats key without BatchNorm)
  step: int
  config: ml_collections.ConfigDict


def data_parallel_mesh(config, devices=None):
  """The mesh for inference on this host: every device on `data`, parameters replicated."""
  return parallel.make_mesh({**config.mesh, "data": -1, "fsdp": 1, "model": 1, "context": 1,
                            "dcn_context": 1}, devices)


def abstract_variables(model, mesh, sample_inputs) -> dict:
  """Shapes and target shardings of params and BatchNorm statistics on `mesh`."""
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample_inputs))
  abstract = parallel.with_shardings(nn.unbox(variables),
                                     parallel.logical_shardings(variables, mesh))
  return {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}


def checked_step(manager, step: int | None) -> int:
  """`step`, or the latest one when None; CheckpointError if the workdir has no such step."""
  available = sorted(manager.all_steps())
  if not available:
    raise checkpoint.CheckpointError(f"no checkpoint in {manager.directory}")
  step = available[-1] if step is None else step
  if step not in available:
    raise checkpoint.CheckpointError(f"checkpoint step {step} not in {manager.directory}; "
                                     f"available steps {available}")
  return step


def restore_variables(manager, step: int, abstract: dict, config_dict: dict,
                      saved_config: dict | None = None) -> dict:
  """The step's params (and batch_stats, when the model has them) on `abstract`'s shardings.

  CheckpointError if the checkpoint's architecture (model.*) differs from config_dict's.
  """
  checkpoint.check_architecture(manager, step, config_dict, saved_config)
  restored = checkpoint.restore_subset(manager, step, abstract)
  return {name: value for name, value in restored.items() if value}


def restore_model(workdir: str, config=None, step: int | None = None,
                  mesh=None) -> RestoredModel:
  """The model of `config` (default: the workdir's config.json) with `step`'s variables (default:
  the latest), on `mesh` (default: this host's devices, data-parallel)."""
  config = config_files.load_run_config(workdir) if config is None else config
  mesh = data_parallel_mesh(config) if mesh is None else mesh
  model = S5Model.from_config(config.model)
  manager = checkpoint.open_readonly(workdir)
  step = checked_step(manager, step)
  sample_inputs = data.example_batch(config.data, 1)["inputs"]
  variables = restore_variables(manager, step, abstract_variables(model, mesh, sample_inputs),
                                config.to_dict())
  return RestoredModel(model, variables, step, config)
