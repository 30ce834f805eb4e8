"""s5scale.ssm's pure functions against the float64 NumPy oracle (tests/ssm_oracle.py).

The first tests check the oracle itself against hand-derived values, so that the rest compare the
implementation with something known to follow docs/design.md,
"The recurrence and its implementations".
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from s5scale import ssm
from tests import ssm_oracle as oracle
from tests.ssm_oracle import assert_close


def random_continuous_system(rng, num_states, num_features, stable=True):
  """Lambda (P',) complex128, B_tilde (P', H) complex128 with HiPPO-like scales."""
  real = -rng.uniform(0.05, 1.0, num_states) if stable else rng.uniform(-1.0, 0.5, num_states)
  lambda_ = real + 1j * rng.uniform(-20.0, 20.0, num_states)
  b_tilde = rng.normal(size=(num_states, num_features)) + 1j * rng.normal(
      size=(num_states, num_features))
  return lambda_, b_tilde


def random_discrete_system(rng, batch, length, num_states, num_features, *, time_varying,
                           bidirectional):
  """Lambda_bar, B_bar, C_tilde, D as complex64/float32 arrays: |Lambda_bar| near 1 so that the
  carried state (and so every reset) matters over the whole sequence."""
  shape = (batch, length, num_states) if time_varying else (num_states,)
  lambda_bar = rng.uniform(0.85, 0.999, shape) * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))
  b_bar = (rng.normal(size=shape + (num_features,)) +
           1j * rng.normal(size=shape + (num_features,))) * 0.1
  c_width = 2 * num_states if bidirectional else num_states
  c_tilde = rng.normal(size=(num_features, c_width)) + 1j * rng.normal(
      size=(num_features, c_width))
  d = rng.normal(size=num_features)
  return (lambda_bar.astype(np.complex64), b_bar.astype(np.complex64),
          c_tilde.astype(np.complex64), d.astype(np.float32))


def random_resets(rng, batch, length):
  reset = rng.random((batch, length)) < 0.15
  reset[:, length // 2] = True  # at least one boundary per row, mid-sequence
  reset[0, 0] = True  # a reset at step 0 must be harmless
  return reset


# ----------------------------------------------------------------------------- oracle self-checks

def test_oracle_legs_hippo_by_hand():
  r3, r5, r15 = np.sqrt(3.0), np.sqrt(5.0), np.sqrt(15.0)
  expected = np.array([[-1.0, 0.0, 0.0], [-r3, -2.0, 0.0], [-r5, -r15, -3.0]])
  np.testing.assert_allclose(oracle.legs_hippo(3), expected, rtol=1e-15)
  normal = oracle.hippo_normal_part(3)
  np.testing.assert_allclose(np.diag(normal), -0.5, rtol=1e-15)
  np.testing.assert_allclose(normal + normal.T, -np.eye(3), atol=1e-14)  # -1/2 + skew


def test_oracle_reset_semantics_by_hand():
  """One state, Lambda_bar = 1/2, B_bar = C = 1, u = (1, 2, 4), a document starting at step 1."""
  u = np.array([1.0, 2.0, 4.0]).reshape(1, 3, 1)
  y = oracle.ssm_loop(np.array([0.5]), np.ones((1, 1)), np.ones((1, 2)), u, conj_sym=False,
                      bidirectional=True, reset=np.array([[False, True, False]]))
  forward = np.array([1.0, 2.0, 0.5 * 2.0 + 4.0])  # the state carried into step 1 is dropped
  backward = np.array([1.0, 2.0 + 0.5 * 4.0, 4.0])  # nothing flows back from step 1 into step 0
  np.testing.assert_allclose(y[0, :, 0], forward + backward, rtol=1e-15)


def test_oracle_zoh_solves_the_ode_with_held_input():
  """ZOH is the exact solution of x' = Lambda x + B u over one step with u held constant."""
  rng = np.random.default_rng(0)
  lambda_, b_tilde = random_continuous_system(rng, 3, 2)
  delta, u, x0 = 0.07, rng.normal(size=2), rng.normal(size=3) + 1j * rng.normal(size=3)
  lambda_bar, b_bar = oracle.discretize(lambda_, b_tilde, np.full(3, delta), "zoh")
  solution = integrate.solve_ivp(lambda t, x: lambda_ * x + b_tilde @ u, (0.0, delta), x0,
                                 rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(lambda_bar * x0 + b_bar @ u, solution.y[:, -1], rtol=1e-9)


def test_oracle_bilinear_is_the_trapezoid_rule():
  """Bilinear: x1 = x0 + delta/2 (f(x0) + f(x1)) with u held constant."""
  rng = np.random.default_rng(1)
  lambda_, b_tilde = random_continuous_system(rng, 3, 2)
  delta, u, x0 = 0.07, rng.normal(size=2), rng.normal(size=3) + 1j * rng.normal(size=3)
  lambda_bar, b_bar = oracle.discretize(lambda_, b_tilde, np.full(3, delta), "bilinear")
  x1 = lambda_bar * x0 + b_bar @ u
  derivative = lambda x: lambda_ * x + b_tilde @ u
  np.testing.assert_allclose(x1, x0 + delta / 2 * (derivative(x0) + derivative(x1)), rtol=1e-12)


# ----------------------------------------------------------------------------- HiPPO-N

@pytest.mark.parametrize("n", [4, 8, 16])
def test_make_dplr_hippo(n):
  lambda_, v = ssm.make_dplr_hippo(n)
  lambda_, v = np.asarray(lambda_), np.asarray(v)
  assert lambda_.shape == (n,) and v.shape == (n, n)
  assert np.iscomplexobj(lambda_) and np.iscomplexobj(v)
  np.testing.assert_allclose(lambda_.real, -0.5, atol=1e-6)
  expected_lambda, _ = oracle.hippo_spectrum(n)
  assert_close(lambda_.imag, expected_lambda.imag)  # same values, eigh (ascending) order
  np.testing.assert_allclose(v.conj().T @ v, np.eye(n), atol=1e-5)
  normal = oracle.hippo_normal_part(n)
  scale = np.max(np.abs(expected_lambda))
  np.testing.assert_allclose(normal @ v, v * lambda_, atol=1e-5 * scale)  # V holds eigenvectors


@pytest.mark.parametrize("ssm_size,blocks,conj_sym",
                         [(16, 1, True), (16, 4, True), (16, 1, False), (16, 4, False),
                          (12, 2, True), (6, 3, False)])
def test_make_block_hippo(ssm_size, blocks, conj_sym):
  lambda_, v, v_inv = (np.asarray(a) for a in ssm.make_block_hippo(ssm_size, blocks, conj_sym))
  num_states = ssm_size // 2 if conj_sym else ssm_size
  block, kept = ssm_size // blocks, num_states // blocks
  assert lambda_.shape == (num_states,)
  assert v.shape == (ssm_size, num_states) and v_inv.shape == (num_states, ssm_size)
  assert_close(lambda_, oracle.block_hippo_lambda(ssm_size, blocks, conj_sym))
  np.testing.assert_allclose(v_inv, v.conj().T, atol=1e-6)

  normal = oracle.hippo_normal_part(block)
  full_spectrum, _ = oracle.hippo_spectrum(block)
  first = v[:block, :kept]
  for j in range(blocks):
    rows, cols = slice(j * block, (j + 1) * block), slice(j * kept, (j + 1) * kept)
    block_v = v[rows, cols]
    np.testing.assert_allclose(block_v, first, atol=1e-6)  # the same block, repeated
    outside = v[rows].copy()
    outside[:, cols] = 0
    np.testing.assert_array_equal(outside, 0)  # block diagonal
    np.testing.assert_allclose(block_v.conj().T @ block_v, np.eye(kept), atol=1e-5)
    np.testing.assert_allclose(normal @ block_v, block_v * lambda_[cols],
                               atol=1e-5 * np.max(np.abs(full_spectrum)))

  if conj_sym:
    # The kept half and its conjugates are the whole block spectrum; with their eigenvectors
    # (conjugates of the kept ones) they span the space: no pair kept twice, none dropped.
    both = np.concatenate([lambda_[:kept], np.conj(lambda_[:kept])])
    assert_close(np.sort_complex(both), np.sort_complex(full_spectrum))
    np.testing.assert_allclose(2 * (first @ first.conj().T).real, np.eye(block), atol=1e-5)


# ----------------------------------------------------------------------------- discretization

@pytest.mark.parametrize("method", ["zoh", "bilinear"])
@pytest.mark.parametrize("per_step", [False, True], ids=["constant_delta", "per_step_delta"])
def test_discretize_float64(method, per_step):
  """In float64 the functions must keep float64/complex128 and agree to rounding."""
  rng = np.random.default_rng(2)
  lambda_, b_tilde = random_continuous_system(rng, 6, 3, stable=False)
  delta_shape = (2, 5, 6) if per_step else (6,)
  delta = np.exp(rng.uniform(np.log(1e-3), np.log(2e-1), delta_shape))
  expected_lambda_bar, expected_b_bar = oracle.discretize(lambda_, b_tilde, delta, method)
  discretize = ssm.discretize_zoh if method == "zoh" else ssm.discretize_bilinear
  with jax.enable_x64(True):
    lambda_bar, b_bar = discretize(jnp.asarray(lambda_), jnp.asarray(b_tilde), jnp.asarray(delta))
    assert lambda_bar.dtype == jnp.complex128 and b_bar.dtype == jnp.complex128
    lambda_bar, b_bar = np.asarray(lambda_bar), np.asarray(b_bar)
  assert lambda_bar.shape == delta_shape and b_bar.shape == delta_shape + (3,)
  np.testing.assert_allclose(lambda_bar, expected_lambda_bar, rtol=1e-12)
  np.testing.assert_allclose(b_bar, expected_b_bar, rtol=1e-10)


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_discretize_float32(method):
  rng = np.random.default_rng(3)
  lambda_, b_tilde = random_continuous_system(rng, 6, 3)
  lambda_, b_tilde = lambda_.astype(np.complex64), b_tilde.astype(np.complex64)
  delta = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), (4, 6))).astype(np.float32)
  expected_lambda_bar, expected_b_bar = oracle.discretize(lambda_, b_tilde, delta, method)
  discretize = ssm.discretize_zoh if method == "zoh" else ssm.discretize_bilinear
  lambda_bar, b_bar = discretize(jnp.asarray(lambda_), jnp.asarray(b_tilde), jnp.asarray(delta))
  assert_close(lambda_bar, expected_lambda_bar)
  # (exp(z) - 1) / Lambda loses a few digits to cancellation in float32 when |Lambda delta| << 1.
  assert_close(b_bar, expected_b_bar, rtol=3e-4)


# ----------------------------------------------------------------------------- apply_ssm

# Each flag pair once plain and once with resets and per-step Lambda_bar/B_bar together (every
# distinct call costs the scan a compile).
APPLY_CASES = [flags + (extras, extras) for flags, extras in itertools.product(
    itertools.product([True, False], [False, True]), [False, True])]


@pytest.mark.parametrize(
    "conj_sym,bidirectional,with_reset,time_varying", APPLY_CASES,
    ids=[f"conj{int(c)}-bidir{int(b)}-reset{int(r)}-varying{int(t)}" for c, b, r, t in APPLY_CASES])
def test_apply_ssm_matches_loop(conj_sym, bidirectional, with_reset, time_varying):
  rng = np.random.default_rng(4)
  batch, length, num_states, num_features = 2, 48, 6, 4
  lambda_bar, b_bar, c_tilde, d = random_discrete_system(
      rng, batch, length, num_states, num_features, time_varying=time_varying,
      bidirectional=bidirectional)
  u = rng.normal(size=(batch, length, num_features)).astype(np.float32)
  reset = random_resets(rng, batch, length) if with_reset else None
  expected = oracle.ssm_loop(lambda_bar, b_bar, c_tilde, u, conj_sym=conj_sym,
                             bidirectional=bidirectional, d=d, reset=reset)
  y = ssm.apply_ssm(lambda_bar, b_bar, c_tilde, u, conj_sym=conj_sym,
                    bidirectional=bidirectional, D=d,
                    reset=None if reset is None else jnp.asarray(reset))
  assert y.shape == u.shape and y.dtype == jnp.float32
  assert_close(y, expected)
  if with_reset:  # the resets must change the answer, or this case tests nothing
    unreset = oracle.ssm_loop(lambda_bar, b_bar, c_tilde, u, conj_sym=conj_sym,
                              bidirectional=bidirectional, d=d)
    assert np.max(np.abs(unreset - expected)) > 1e-2 * np.max(np.abs(expected))


def test_apply_ssm_without_d_and_any_batch_dims():
  rng = np.random.default_rng(5)
  length, num_states, num_features = 20, 4, 3
  lambda_bar, b_bar, c_tilde, _ = random_discrete_system(
      rng, 1, length, num_states, num_features, time_varying=False, bidirectional=True)
  u = rng.normal(size=(2, 3, length, num_features)).astype(np.float32)
  reset = rng.random((2, 3, length)) < 0.2
  y = ssm.apply_ssm(lambda_bar, b_bar, c_tilde, u, conj_sym=False, bidirectional=True,
                    reset=jnp.asarray(reset))
  assert y.shape == u.shape
  expected = oracle.ssm_loop(lambda_bar, b_bar, c_tilde, u.reshape(6, length, num_features),
                             conj_sym=False, bidirectional=True, reset=reset.reshape(6, length))
  assert_close(np.asarray(y).reshape(6, length, num_features), expected)
  # No batch dims at all.
  y_single = ssm.apply_ssm(lambda_bar, b_bar, c_tilde, u[1, 2], conj_sym=False, bidirectional=True)
  expected_single = oracle.ssm_loop(lambda_bar, b_bar, c_tilde, u[1, 2][None], conj_sym=False,
                                    bidirectional=True)[0]
  assert y_single.shape == (length, num_features)
  assert_close(y_single, expected_single)


@pytest.mark.parametrize("conj_sym,bidirectional", [(True, True)])
def test_apply_ssm_float64_keeps_precision(conj_sym, bidirectional):
  rng = np.random.default_rng(6)
  batch, length, num_states, num_features = 2, 30, 5, 3
  lambda_bar, b_bar, c_tilde, d = random_discrete_system(
      rng, batch, length, num_states, num_features, time_varying=True, bidirectional=bidirectional)
  lambda_bar, b_bar, c_tilde = (a.astype(np.complex128) for a in (lambda_bar, b_bar, c_tilde))
  d = d.astype(np.float64)
  u = rng.normal(size=(batch, length, num_features))
  reset = random_resets(rng, batch, length)
  expected = oracle.ssm_loop(lambda_bar, b_bar, c_tilde, u, conj_sym=conj_sym,
                             bidirectional=bidirectional, d=d, reset=reset)
  with jax.enable_x64(True):
    y = ssm.apply_ssm(jnp.asarray(lambda_bar), jnp.asarray(b_bar), jnp.asarray(c_tilde),
                      jnp.asarray(u), conj_sym=conj_sym, bidirectional=bidirectional,
                      D=jnp.asarray(d), reset=jnp.asarray(reset))
    assert y.dtype == jnp.float64
    y = np.asarray(y)
  np.testing.assert_allclose(y, expected, rtol=1e-11, atol=1e-12 * np.max(np.abs(expected)))


# ----------------------------------------------------------------------------- step

@pytest.mark.parametrize("conj_sym,time_varying", [(True, False), (False, True)])
def test_step_matches_loop(conj_sym, time_varying):
  rng = np.random.default_rng(7)
  batch, length, num_states, num_features = 2, 40, 6, 4
  lambda_bar, b_bar, c_tilde, d = random_discrete_system(
      rng, batch, length, num_states, num_features, time_varying=time_varying,
      bidirectional=False)
  u = rng.normal(size=(batch, length, num_features)).astype(np.float32)
  expected = oracle.ssm_loop(lambda_bar, b_bar, c_tilde, u, conj_sym=conj_sym,
                             bidirectional=False, d=d)

  def one_step(state, inputs):
    u_t, lambda_bar_t, b_bar_t = inputs
    return ssm.step(lambda_bar_t, b_bar_t, c_tilde, state, u_t, conj_sym=conj_sym, D=d)

  if time_varying:  # (batch, L, ...) -> (L, batch, ...) to scan over time
    per_step = (jnp.swapaxes(lambda_bar, 0, 1), jnp.swapaxes(b_bar, 0, 1))
  else:
    per_step = (jnp.broadcast_to(lambda_bar, (length,) + lambda_bar.shape),
                jnp.broadcast_to(b_bar, (length,) + b_bar.shape))
  state0 = jnp.zeros((batch, num_states), jnp.complex64)
  final_state, ys = jax.lax.scan(one_step, state0, (jnp.swapaxes(u, 0, 1),) + per_step)
  assert final_state.shape == (batch, num_states)
  assert_close(jnp.swapaxes(ys, 0, 1), expected)
  parallel = ssm.apply_ssm(lambda_bar, b_bar, c_tilde, u, conj_sym=conj_sym, bidirectional=False,
                           D=d)
  assert_close(parallel, expected)
