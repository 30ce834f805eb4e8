"""The chunked linear recurrence (chunked_scan.py) against a float64 NumPy loop written from its
equation.

    forward:  x_k = a_k keep_k x_{k-1} + b_k        reverse: x_k = a_k keep_k x_{k+1} + b_k

with x = 0 outside the sequence. Values are checked in float32 against the float64 loop, and
gradients in float64 against central differences of the loop, so the custom backward pass (a
reverse scan with its own dL/da) is checked against nothing but the forward equation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s5scale.ssm import chunked_scan
from s5scale.ssm import recurrence
from s5scale.ssm import s5
from tests.ssm_oracle import (assert_recurrence_gradients, loop_recurrence, planar,
                              random_problem, unplanar)

chunked_recurrence = functools.partial(recurrence.linear_recurrence_planar, impl="chunked")


def chunked_complex_states(a, b, keep, reverse, num_chunks, dtype):
  """The code under test, complex in and out, computed in dtype."""
  states = chunked_recurrence(
      jnp.asarray(planar(a), dtype), jnp.asarray(planar(b), dtype),
      None if keep is None else jnp.asarray(keep, dtype), reverse=reverse, num_chunks=num_chunks)
  assert states.dtype == dtype
  return unplanar(np.asarray(states, np.float64))


# ----------------------------------------------------------------------------- values

# Lengths: 1; prime (no chunking possible); lengths whose chunks are no power of two; and chunk
# counts from one sequential chunk to one step per chunk.
VALUE_CASES = [
    # (leading dims, L, num_chunks, reverse, varying multipliers, with resets)
    ((2, 3), 1, None, False, False, True),
    ((2, 3), 7, None, True, False, True),
    ((2, 3), 7, 7, False, True, True),     # one step per chunk
    ((3,), 12, None, False, False, False),
    ((3,), 12, 4, True, True, False),
    ((3,), 60, 5, False, False, True),     # 5 chunks of 12
    ((3,), 60, 5, True, False, True),
    ((), 60, 1, True, True, True),         # no batch dims, one sequential chunk
    ((2,), 1000, None, False, False, True),  # the chosen 50 chunks of 20
    ((2,), 1000, None, True, False, False),
    ((2,), 1000, 8, False, True, True),
]


@pytest.mark.parametrize("leading,length,num_chunks,reverse,varying,with_keep", VALUE_CASES)
def test_float32_states_match_float64_loop(leading, length, num_chunks, reverse, varying,
                                           with_keep):
  rng = np.random.default_rng(length * 7 + 3)
  a, b, keep = random_problem(rng, leading, length, 4, varying=varying, with_keep=with_keep)
  expected = loop_recurrence(a, b, keep, reverse)
  actual = chunked_complex_states(a, b, keep, reverse, num_chunks, jnp.float32)
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def test_reset_drops_exactly_the_carried_state():
  """Hand-checkable: a = 1, b = 1, keep 0 at step 3: 1 2 3 | 1 2 forward, 4 3 2 1 | 1 reverse."""
  a = np.ones(1, np.complex128)
  b = np.ones((1, 5, 1), np.complex128)
  keep = np.array([[1.0, 1.0, 1.0, 0.0, 1.0]])
  forward = chunked_complex_states(a, b, keep, False, None, jnp.float32)[0, :, 0]
  np.testing.assert_allclose(forward, [1, 2, 3, 1, 2])
  # Reverse, keep_k gates the state carried from k+1 into k.
  backward = chunked_complex_states(a, b, keep, True, None, jnp.float32)[0, :, 0]
  np.testing.assert_allclose(backward, [4, 3, 2, 1, 1])


def test_complex_interface_matches_loop():
  rng = np.random.default_rng(5)
  a, b, _ = random_problem(rng, (2,), 24, 3, varying=False, with_keep=False)
  for reverse in (False, True):
    states = recurrence.linear_recurrence(jnp.asarray(a, jnp.complex64),
                                         jnp.asarray(b, jnp.complex64), reverse=reverse)
    assert states.dtype == jnp.complex64
    expected = loop_recurrence(a, b, reverse=reverse)
    np.testing.assert_allclose(np.asarray(states), expected, rtol=1e-5,
                               atol=1e-5 * np.max(np.abs(expected)))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_scan_states_chunked_follows_reset_convention(bidirectional):
  """Forward: reset[k] drops the state carried into k. Backward: reset[k+1] drops k+1 -> k."""
  rng = np.random.default_rng(9)
  a, b, _ = random_problem(rng, (2,), 30, 3, varying=False, with_keep=False)
  reset = rng.random((2, 30)) < 0.2
  reset[:, 11] = True
  states = s5.scan_states(jnp.asarray(a, jnp.complex64), jnp.asarray(b, jnp.complex64),
                          bidirectional=bidirectional, reset=jnp.asarray(reset), impl="chunked")
  keep = 1.0 - reset
  expected = loop_recurrence(a, b, keep)
  if bidirectional:
    backward_keep = np.concatenate([keep[:, 1:], np.ones((2, 1))], axis=1)
    expected = np.concatenate([expected, loop_recurrence(a, b, backward_keep, reverse=True)], -1)
  np.testing.assert_allclose(np.asarray(states), expected, rtol=1e-5,
                             atol=1e-5 * np.max(np.abs(expected)))


# ----------------------------------------------------------------------------- gradients

GRADIENT_CASES = [
    # (reverse, varying, with_keep, leading, L, num_chunks)
    (False, False, True, (1, 2), 12, 3),
    (True, False, True, (2,), 11, None),
    (False, True, True, (2,), 12, 4),
    (True, True, True, (2,), 9, 3),
]


@pytest.mark.parametrize("reverse,varying,with_keep,leading,length,num_chunks", GRADIENT_CASES)
def test_float64_gradients_match_finite_differences(reverse, varying, with_keep, leading,
                                                    length, num_chunks):
  """Every coordinate of dL/da and dL/db, L = Σ w · planar(x), by central differences."""
  rng = np.random.default_rng(length + 31 * varying + 7 * reverse)
  a, b, keep = random_problem(rng, leading, length, 2, varying=varying, with_keep=with_keep)
  assert_recurrence_gradients(
      lambda a_, b_, keep_: chunked_recurrence(a_, b_, keep_, reverse=reverse,
                                               num_chunks=num_chunks),
      a, b, keep, reverse, rng.normal(size=planar(b).shape))


def test_complex_gradients_follow_jax_convention():
  """For a real loss of complex z, JAX's gradient is ∂L/∂Re z − i ∂L/∂Im z (what autodiff of
  the reference associative scan returns); the chunked scan's custom VJP must give the same."""
  rng = np.random.default_rng(13)
  a, b, _ = random_problem(rng, (2,), 10, 2, varying=False, with_keep=False)
  weights = rng.normal(size=b.shape) + 1j * rng.normal(size=b.shape)

  def oracle_loss(a, b):
    return np.sum((weights * loop_recurrence(a, b)).real)

  with jax.enable_x64(True):
    def loss(a, b):
      return jnp.sum((weights * recurrence.linear_recurrence(a, b)).real)

    grad_a, grad_b = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(a), jnp.asarray(b))
  eps = 1e-6
  for analytic, which in ((np.asarray(grad_a), 0), (np.asarray(grad_b), 1)):
    point = [a, b]
    for index in [(0,), (1,)] if which == 0 else [(0, 3, 1), (1, 9, 0)]:
      numeric = 0j
      for unit in (1.0, 1j):
        plus = [p.copy() for p in point]
        minus = [p.copy() for p in point]
        plus[which][index] += eps * unit
        minus[which][index] -= eps * unit
        derivative = (oracle_loss(*plus) - oracle_loss(*minus)) / (2 * eps)
        numeric += derivative if unit == 1.0 else -1j * derivative
      np.testing.assert_allclose(analytic[index], numeric, rtol=1e-7)


# ----------------------------------------------------------------------------- arguments

def test_bad_num_chunks_is_rejected_by_name():
  b = jnp.zeros((2, 12, 2, 4))
  with pytest.raises(ValueError, match="num_chunks"):
    chunked_recurrence(jnp.zeros((2, 4)), b, num_chunks=5)


def test_mismatched_shapes_are_rejected():
  with pytest.raises(ValueError, match="multipliers"):
    chunked_recurrence(jnp.zeros((2, 3)), jnp.zeros((2, 12, 2, 4)))
  with pytest.raises(ValueError, match="planar"):
    chunked_recurrence(jnp.zeros((2, 4)), jnp.zeros((2, 12, 8)))


@pytest.mark.parametrize("length", [1, 7, 12, 1000, 16384, 16382])
def test_chunk_count_divides_the_length(length):
  chunks = chunked_scan.num_chunks_for(length)
  assert 1 <= chunks <= length and length % chunks == 0


# ----------------------------------------------------------------------------- sharding

def test_states_sharded_over_model_scan_without_collectives():
  """docs/design.md, mesh: with P' sharded over `model` and batch over `data`, every device scans
  its own states: no collective inside any loop (the real and imaginary parts of a state stay together)."""
  import re  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  rng = np.random.default_rng(3)
  num_states, features = 16, 8
  lambda_bar = jnp.asarray(0.9 * np.exp(1j * rng.uniform(-1, 1, num_states)), jnp.complex64)
  b_bar = jnp.asarray(rng.normal(size=(num_states, features)), jnp.complex64)
  c_tilde = jnp.asarray(rng.normal(size=(features, num_states)), jnp.complex64)
  u = jnp.asarray(rng.normal(size=(4, 64, features)), jnp.float32)
  reset = jnp.asarray(rng.random((4, 64)) < 0.1)
  put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))
  args = (put(lambda_bar, "model"), put(b_bar, "model", None), put(c_tilde, None, "model"),
          put(u, "data"), put(reset, "data"))

  def loss(lambda_bar, b_bar, c_tilde, u, reset):
    return jnp.sum(s5.apply_ssm(lambda_bar, b_bar, c_tilde, u, conj_sym=True,
                                bidirectional=False, reset=reset, impl="chunked") ** 2)

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile().as_text()
  computations = {block.split(" ", 1)[0].lstrip("%"): block for block in hlo.split("\n\n")}
  bodies = set(re.findall(r"body=%([\w.\-]+)", hlo))
  assert bodies, "the scan should compile to loops"
  local_states = num_states // 4
  assert any(f",2,{local_states}]" in computations[body] for body in bodies), (
      "loops should carry each device's shard of the states")
  collective = re.compile(r"(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)\(")
  assert not [body for body in bodies if collective.search(computations[body])]


def test_states_are_written_in_place():
  """Fwd+bwd keeps about one state-sized buffer per pass: the states overwrite B̄u, the adjoint
  overwrites dL/dx, and no loop copies a whole buffer on any step."""
  import re  # pylint: disable=g-import-not-at-top
  batch, length, num_states = 4, 256, 16
  inputs = jnp.ones((batch, length, 2, num_states))
  multipliers = jnp.full((2, num_states), 0.5)
  keep = jnp.ones((batch, length))

  def loss(multipliers, inputs, weights):
    # inputs * 2 makes B̄u an intermediate, as in the layer, rather than a caller's argument
    states = chunked_recurrence(multipliers, inputs * 2, keep)
    return jnp.sum(states * weights)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(multipliers, inputs, inputs).compile()
  assert compiled.memory_analysis().temp_size_in_bytes <= 2 * inputs.nbytes
  hlo = compiled.as_text()
  chunks = chunked_scan.num_chunks_for(length)
  whole_buffer = f"f32[{batch},{chunks},{length // chunks},2,{num_states}]"
  for body in set(re.findall(r"body=%([\w.\-]+)", hlo)):
    text = hlo[hlo.index(f"%{body} "):]
    text = text[:text.index("\n}")]
    assert not [line for line in text.splitlines() if " copy(" in line and whole_buffer in line]
