"""The residual stream sharded over H between blocks, remat policies, bfloat16 stream.

Oracles: the shape of each device's shard, the compiled HLO's collectives (counted by
s5scale.hlo_stats) against the count the block's design implies, and jax's own list of the
residuals a backward pass saves.
"""

import contextlib
import importlib.util
import io
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s5scale import hlo_stats, parallel
from s5scale.nn.blocks import ResidualBlock
from s5scale.nn.model import S5Model
from tests.helpers import (ALL_GROUPS, hlo_computations, reachable, tiny_config,
                           train_in_process)

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None

BATCH, LENGTH = 8, 32


# The losses on H-sharded meshes (model 2 with remat none, model 8 with remat full) against the
# 1-device run are in tests/test_mesh.py::test_same_losses_on_every_mesh, with these groups.


def _sharded_variables(model, mesh, tokens):
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))
  shardings = parallel.logical_shardings(boxed, mesh)
  return shardings, parallel.with_shardings(nn.unbox(boxed), shardings)


def test_each_device_holds_h_over_model_of_the_residual_stream():
  config = tiny_config(mesh__data=2, mesh__fsdp=1, mesh__model=4, model__scan_layers=False,
                       **ALL_GROUPS)
  mesh = parallel.make_mesh(config.mesh)
  model = S5Model.from_config(config.model)
  tokens = np.zeros((BATCH, LENGTH), np.int32)
  shardings, _ = _sharded_variables(model, mesh, tokens)
  variables = jax.jit(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), tokens)),
                      out_shardings=shardings)()

  def block_outputs(variables, tokens):
    with parallel.logical_constraints(mesh):
      _, captured = model.apply(variables, tokens, mutable=["intermediates"],
                                capture_intermediates=lambda m, _: isinstance(m, ResidualBlock))
    return captured["intermediates"]

  captured = jax.jit(block_outputs, in_shardings=(shardings, parallel.batch_sharding(mesh)))(
      variables, tokens)
  d_model = config.model.d_model
  for name in ("block_0", "block_1"):
    residual, _ = captured[name]["__call__"][0]
    assert residual.shape == (BATCH, LENGTH, d_model)
    assert {s.data.shape for s in residual.addressable_shards} == {
        (BATCH // 2, LENGTH, d_model // 4)}, name


def _forward_hlo(config, devices, length) -> str:
  """The compiled forward pass (parameters in, logits out) on the config's mesh over devices."""
  mesh = parallel.make_mesh(config.mesh, devices)
  model = S5Model.from_config(config.model)
  tokens = np.zeros((BATCH, length), np.int32)
  shardings, abstract = _sharded_variables(model, mesh, tokens)

  def forward(variables, tokens):
    with parallel.logical_constraints(mesh):
      return model.apply(variables, tokens)

  batch = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype, sharding=parallel.batch_sharding(mesh))
  return jax.jit(forward, in_shardings=(shardings, batch.sharding)).lower(
      abstract, batch).compile().as_text()


def _elements(type_text: str) -> list[int]:
  """Element count of each array in an HLO type text (a tuple has several)."""
  return [int(np.prod([int(d) for d in dims.split(",") if d]))
          for dims in re.findall(r"\[([\d,]*)\]", type_text)]


@pytest.mark.parametrize("backend", ["cpu", pytest.param("tpu", marks=pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed, so TPU programs cannot be compiled"))])
def test_forward_crosses_the_model_axis_once_per_projection_group(backend):
  layers, data_ways, model_ways, length = 3, 2, 4, 128
  # Big enough that TPU scatters: for arrays of a few KiB it all-reduces and slices instead.
  config = tiny_config(mesh__data=data_ways, mesh__fsdp=1, mesh__model=model_ways,
                       model__num_layers=layers, model__d_model=256, model__ssm_size=256,
                       **ALL_GROUPS)
  if backend == "tpu":
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only, like aot_compile
    from jax.experimental import topologies
    devices = list(topologies.get_topology_desc("v5e:2x4", "tpu").devices)
  else:
    devices = jax.devices()
  # TPU fuses a reduce-scatter as all-reduce + slice; the CPU backend runs it as those two ops.
  scatter_kind = "reduce-scatter" if backend == "tpu" else "all-reduce"
  rows = BATCH // data_ways * length
  whole, split = rows * config.model.d_model, rows * config.model.d_model // model_ways
  counts = {"gather": 0, "scatter": 0, "norm statistics": 0}
  unexpected = []
  for call in hlo_stats.collective_calls(_forward_hlo(config, devices, length)):
    operands = [n for t in call["operands"] for n in _elements(t)]
    results = _elements(call["result"])
    if call["kind"] == "all-gather" and results[-1:] == [whole] and operands == [split]:
      counts["gather"] += call["count"]
    elif call["kind"] == scatter_kind and operands == [whole]:
      counts["scatter"] += call["count"]
    elif call["kind"] == "all-reduce" and set(operands) == {rows}:
      counts["norm statistics"] += call["count"]
    else:
      unexpected.append(call)
  assert not unexpected, unexpected
  # Per block: gathers before the S5 input projection, the GLU and the MLP; reduce-scatters after
  # the S5 readout and the MLP's output projection; one statistics all-reduce per LayerNorm. Then
  # the final norm and the gather before the head.
  assert counts == {"gather": 3 * layers + 1, "scatter": 2 * layers,
                    "norm statistics": 2 * layers + 1}


def test_no_collective_inside_a_loop_over_time_with_h_sharded_activations():
  config = tiny_config(mesh__data=1, mesh__fsdp=1, mesh__model=8, model__remat="full",
                       **ALL_GROUPS)
  mesh = parallel.make_mesh(config.mesh)
  from s5scale import training
  sample = {"inputs": np.zeros((BATCH, LENGTH), np.int32),
            "targets": np.zeros((BATCH, LENGTH), np.int32),
            "mask": np.ones((BATCH, LENGTH), np.float32), "reset": np.zeros((BATCH, LENGTH), bool),
            "target_bytes": np.ones((BATCH, LENGTH), np.int32)}
  model, optimizer, schedule, abstract_state, shardings = training.build_model_and_state(
      config, mesh, sample)
  text = training.jit_train_step(config, mesh, model, optimizer, schedule, shardings).lower(
      abstract_state, training.abstract_batch(sample, mesh)).compile().as_text()
  computations = hlo_computations(text)
  bodies = re.findall(r"while\(.*body=%?([\w.\-]+)", "\n".join(computations.values()))
  # Loops over time hold no further loop; the layer scan around them may communicate.
  time_loops = [b for b in bodies
                if not any("while(" in computations[c] for c in reachable(computations, b))]
  assert time_loops
  inside = {c for b in time_loops for c in reachable(computations, b)}
  calls = hlo_stats.collective_calls(text)
  assert calls, "the sharded step should communicate"
  assert not [c for c in calls if c["computation"] in inside]


def _saved_residuals(remat: str, residual_dtype: str) -> list[str]:
  """jax's own list of what the backward pass keeps: one line per residual."""
  config = tiny_config(model__remat=remat, model__residual_dtype=residual_dtype,
                       model__num_layers=3, **ALL_GROUPS)
  model = S5Model.from_config(config.model)
  tokens = jnp.zeros((BATCH, LENGTH), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    jax.ad_checkpoint.print_saved_residuals(
        lambda p: model.apply({"params": p}, tokens).sum(), params)
  return printed.getvalue().splitlines()


@pytest.mark.parametrize("remat, residual_dtype, saved", [
    ("full", "float32", "f32[3,8,32,16]"),
    ("full", "bfloat16", "bf16[3,8,32,16]"),
    ("offload", "float32", "f32<host>[3,8,32,16]"),
    ("offload", "bfloat16", "bf16<host>[3,8,32,16]"),
])
def test_remat_saves_only_each_blocks_input(remat, residual_dtype, saved):
  # What the layer scan keeps per layer: (layers, batch, L, ...) arrays.
  per_layer = [line.split()[0] for line in _saved_residuals(remat, residual_dtype)
               if re.match(r"\w+(<host>)?\[3,8,32[,\]]", line)]
  assert per_layer == [saved]
  assert len([line for line in _saved_residuals("none", residual_dtype)
              if re.match(r"\w+(<host>)?\[3,8,32[,\]]", line)]) > 5


def test_bfloat16_residual_stream_keeps_float32_parameters_and_close_losses(tmp_path):
  results = {}
  for residual_dtype in ("float32", "bfloat16"):
    config = tiny_config(train__num_steps=3, checkpoint__every_steps=100, mesh__data=8,
                         model__residual_dtype=residual_dtype)
    results[residual_dtype] = train_in_process(config, tmp_path / residual_dtype)
  np.testing.assert_allclose([results["bfloat16"][s] for s in (1, 2, 3)],
                             [results["float32"][s] for s in (1, 2, 3)], rtol=2e-2)
  config = tiny_config(model__residual_dtype="bfloat16")
  model = S5Model.from_config(config.model)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((BATCH, LENGTH), jnp.int32)))
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
