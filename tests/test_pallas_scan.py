"""The Pallas TPU kernel for the linear recurrence, and the dispatcher that picks it.

    forward:  x_k = a_k keep_k x_{k-1} + b_k        reverse: x_k = a_k keep_k x_{k+1} + b_k

On CPU the kernel runs in Pallas' interpreter: values in float32 under the TPU interpreter
(pltpu.InterpretParams, TPU semantics) against the float64 NumPy loop of test_chunked_scan, and
gradients in float64 (interpret=True) against central differences of that loop, so the kernel's
adjoint is checked against nothing but the forward equation. Lengths are not multiples of the
time tile. Compiling for TPU needs libtpu (compile-only devices, no TPU): only those tests are
skipped, and say so, when it is missing.
"""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from s5scale.ssm import pallas_scan
from s5scale.ssm import recurrence
from tests.ssm_oracle import (assert_recurrence_gradients, loop_recurrence, planar,
                              random_problem, unplanar)

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'), so TPU programs "
    "cannot be compiled on this machine")


def kernel_states(a, b, keep, reverse, time_tile, dtype, interpret):
  states = recurrence.linear_recurrence_planar(
      jnp.asarray(planar(a), dtype), jnp.asarray(planar(b), dtype),
      None if keep is None else jnp.asarray(keep, dtype), reverse=reverse, impl="pallas",
      time_tile=time_tile, interpret=interpret)
  assert states.dtype == dtype
  return unplanar(np.asarray(states, np.float64))


# ----------------------------------------------------------------------------- values

VALUE_CASES = [
    # (leading dims, L, time tile, P, reverse, varying multipliers, with resets)
    ((2,), 13, 4, 5, False, False, True),     # 4 tiles, the last padded by 3 steps
    ((2,), 13, 4, 5, True, True, True),       # reverse starts in the padded tile
    ((3,), 10, 4, 3, True, False, False),     # constant a, no resets: the kernel's own a
    ((1, 2), 9, 8, 256, False, True, False),  # P a multiple of 128: lane-dense state tiles
]


@pytest.mark.parametrize("leading,length,time_tile,num_states,reverse,varying,with_keep",
                         VALUE_CASES)
def test_kernel_matches_float64_loop(leading, length, time_tile, num_states, reverse, varying,
                                     with_keep):
  assert length % time_tile, "the cases are chosen to need padding"
  rng = np.random.default_rng(length + 5 * reverse + 11 * varying)
  a, b, keep = random_problem(rng, leading, length, num_states, varying=varying,
                              with_keep=with_keep)
  expected = loop_recurrence(a, b, keep, reverse)
  actual = kernel_states(a, b, keep, reverse, time_tile, jnp.float32, pltpu.InterpretParams())
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.max(np.abs(expected)))


# ----------------------------------------------------------------------------- gradients

GRADIENT_CASES = [
    # (reverse, varying, with_keep, L, time tile)
    (False, False, False, 9, 4),   # constant a: dL/da summed inside the adjoint kernel
    (True, False, True, 9, 4),     # resets make a_k keep_k vary: dL/da summed after
    (True, True, True, 7, 3),
]


@pytest.mark.parametrize("reverse,varying,with_keep,length,time_tile", GRADIENT_CASES)
def test_kernel_gradients_match_finite_differences(reverse, varying, with_keep, length,
                                                   time_tile):
  """Every coordinate of dL/da and dL/db, L = Σ w · planar(x), by central differences."""
  rng = np.random.default_rng(length + 31 * varying + 7 * reverse + 3 * with_keep)
  a, b, keep = random_problem(rng, (2,), length, 2, varying=varying, with_keep=with_keep)
  assert_recurrence_gradients(
      lambda a_, b_, keep_: recurrence.linear_recurrence_planar(
          a_, b_, keep_, reverse=reverse, impl="pallas", time_tile=time_tile, interpret=True),
      a, b, keep, reverse, rng.normal(size=planar(b).shape))


# ----------------------------------------------------------------------------- tiling

def test_time_tile_prefers_a_divisor_and_stays_within_vmem_budget():
  # 131072 steps of P=512: 1 MiB / (8 sublanes x 512 lanes x 4 bytes) = 64 steps, dividing L.
  assert pallas_scan.time_tile_for(131072, 512) == 64
  assert pallas_scan.time_tile_for(100, 4) == 100        # short: one tile, no padding
  tile = pallas_scan.time_tile_for(1031, 4)               # prime: no divisor, so padded
  assert pallas_scan.MIN_TILE <= tile <= pallas_scan.MAX_TILE and 1031 % tile
  assert pallas_scan.state_tile_for(512) == 512 and pallas_scan.state_tile_for(3072) == 1024
  assert pallas_scan.state_tile_for(1000) == 1000  # whole P: not a multiple of 128


# ----------------------------------------------------------------------------- the dispatcher

def test_auto_on_cpu_is_the_chunked_scan_and_never_lowers_the_kernel():
  rng = np.random.default_rng(4)
  a, b, keep = random_problem(rng, (2,), 24, 3, varying=False, with_keep=True)
  args = (jnp.asarray(planar(a), jnp.float32), jnp.asarray(planar(b), jnp.float32),
          jnp.asarray(keep, jnp.float32))

  def loss(impl, a, b, keep):
    return jnp.sum(recurrence.linear_recurrence_planar(a, b, keep, impl=impl) ** 2)

  auto = jax.jit(jax.value_and_grad(functools.partial(loss, "auto"), argnums=(0, 1)))
  hlo = auto.lower(*args).compile().as_text()
  assert "tpu_custom_call" not in hlo and "while" in hlo
  value, grads = auto(*args)
  expected = loop_recurrence(a, b, keep)
  np.testing.assert_allclose(float(value), np.sum(np.abs(expected) ** 2), rtol=1e-5)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_unknown_impl_is_rejected_by_name():
  with pytest.raises(ValueError, match="scan_impl"):
    recurrence.linear_recurrence_planar(jnp.zeros((2, 4)), jnp.zeros((1, 8, 2, 4)), impl="default")


# ----------------------------------------------------------------------------- TPU, ahead of time

def _tpu_mesh(topology: str) -> Mesh:
  # Compile-only: another process (a parallel pytest worker, an aot_compile run) may hold
  # libtpu's lockfile, which only matters when a real TPU is attached.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(topology, "tpu").devices
  return Mesh(np.asarray(devices).reshape(-1), ("batch",))


@needs_libtpu
def test_auto_compiles_the_kernel_for_tpu_with_honest_bytes_and_no_gather():
  """For a v5e slice the same `auto` call lowers to the Mosaic kernel. Rows stay sharded (no
  collective moves them) and XLA's cost analysis, which takes the kernel's CostEstimate, equals
  the bytes the kernel must move: one read of b and one write of x per device."""
  mesh = _tpu_mesh("v5e:2x2")
  batch, length, num_states = 8, 4096, 512
  spec = PartitionSpec("batch", None, None, None)
  inputs = jax.ShapeDtypeStruct((batch, length, 2, num_states), jnp.float32,
                                sharding=NamedSharding(mesh, spec))
  multipliers = jax.ShapeDtypeStruct((2, num_states), jnp.float32,
                                     sharding=NamedSharding(mesh, PartitionSpec()))

  def states(a, b):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return recurrence.linear_recurrence_planar(a, b, impl="auto", sharding=spec)

  # b donated, as B̄u is an intermediate in the layer: the kernel then writes x over it in place.
  compiled = jax.jit(states, donate_argnums=1).lower(multipliers, inputs).compile()
  hlo = compiled.as_text()
  assert hlo.count('custom_call_target="tpu_custom_call"') == 1
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  per_device = (batch // 4) * length * 2 * num_states * 4
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  assert analysis["bytes accessed"] == 2 * per_device + 2 * num_states * 4  # b, x; a once
  assert analysis["flops"] == (batch // 4) * length * num_states * 8
  assert compiled.memory_analysis().temp_size_in_bytes == 0


@needs_libtpu
def test_gradient_compiles_both_kernels_for_tpu():
  mesh = _tpu_mesh("v5e:2x2")
  spec = PartitionSpec("batch", None, None, None)
  inputs = jax.ShapeDtypeStruct((8, 1000, 2, 256), jnp.float32,
                                sharding=NamedSharding(mesh, spec))
  multipliers = jax.ShapeDtypeStruct((2, 256), jnp.float32,
                                     sharding=NamedSharding(mesh, PartitionSpec()))
  keep = jax.ShapeDtypeStruct((8, 1000), jnp.float32,
                              sharding=NamedSharding(mesh, PartitionSpec("batch")))

  def loss(a, b, keep, reverse):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return jnp.sum(recurrence.linear_recurrence_planar(a, b, keep, reverse, impl="pallas",
                                                         sharding=spec) ** 2)

  for reverse in (False, True):
    grad = jax.jit(jax.grad(functools.partial(loss, reverse=reverse), argnums=(0, 1)))
    hlo = grad.lower(multipliers, inputs, keep).compile().as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == 2  # forward, adjoint


def test_config_asking_for_the_kernel_off_tpu_is_rejected_by_name():
  from s5scale import config_check, defaults  # pylint: disable=g-import-not-at-top
  config = defaults.base_config()
  config.model.scan_impl = "pallas"
  with pytest.raises(config_check.ConfigError, match="model.scan_impl"):
    config_check.check_on_devices(config, jax.devices()[:1], 1)
  config.model.scan_impl = "auto"
  config_check.check_on_devices(config, jax.devices()[:1], 1)
