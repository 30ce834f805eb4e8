"""Float64 NumPy oracle for the S5 layer, written from the equations of
docs/design.md, "The recurrence and its implementations".

Deliberately naive: eigendecompositions with numpy, discretization elementwise, and the recurrence
as an explicit Python loop over time (vectorised only over batch). Nothing here imports s5scale, so
the tests compare the JAX code against an independent derivation, never against itself.

Conventions shared with the paper's reference code:
- the reverse (bidirectional) scan is z_k = Lambda_bar_k * z_{k+1} + B_bar_k u_k, i.e. step k uses
  its own discretization in both directions (what a reverse associative scan over the same
  elements computes);
- a reset at step k zeroes the forward state carried into k, and the backward state carried from
  k+1 into k when reset[k+1] (the document boundary lies between k and k+1).
"""

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------- HiPPO-N

def legs_hippo(n):
  """HiPPO-LegS matrix A (n, n) float64: -(sqrt(2i+1) sqrt(2k+1)) below, -(i+1) on the diagonal."""
  root = np.sqrt(2.0 * np.arange(n) + 1.0)
  a = np.zeros((n, n))
  for i in range(n):
    for k in range(n):
      if i > k:
        a[i, k] = -root[i] * root[k]
      elif i == k:
        a[i, k] = -(i + 1.0)
  return a


def hippo_normal_part(n):
  """S = A + p p^T with p_i = sqrt(i + 1/2): (n, n) float64, diagonal -1/2 plus a skew part."""
  p = np.sqrt(np.arange(n) + 0.5)
  return legs_hippo(n) + np.outer(p, p)


def hippo_spectrum(n):
  """Eigen-decomposition of S: Lambda (n,) complex128 = mean(diag S) + i eig(-i S), ascending in
  the imaginary part (eigh order), and unitary V (n, n) with S = V diag(Lambda) V^H."""
  s = hippo_normal_part(n)
  skew = s - np.diag(np.diag(s))
  imag, v = np.linalg.eigh(-1j * skew)  # -i * skew is exactly Hermitian
  return np.mean(np.diag(s)) + 1j * imag, v


def block_hippo_lambda(ssm_size, blocks, conj_sym):
  """Lambda (P',) complex128: the block's eigenvalues (first half if conj_sym) repeated J times."""
  block_lambda, _ = hippo_spectrum(ssm_size // blocks)
  if conj_sym:
    block_lambda = block_lambda[: len(block_lambda) // 2]
  return np.tile(block_lambda, blocks)


# ----------------------------------------------------------------------------- discretization

def discretize(lambda_, b_tilde, delta, method):
  """Lambda (P',), B_tilde (P', H), delta (..., P') -> Lambda_bar (..., P'), B_bar (..., P', H)."""
  lambda_ = np.asarray(lambda_, np.complex128)
  b_tilde = np.asarray(b_tilde, np.complex128)
  delta = np.asarray(delta, np.float64)
  lambda_bar = np.empty(delta.shape, np.complex128)
  b_scale = np.empty(delta.shape, np.complex128)
  for index in np.ndindex(delta.shape):
    lam, dt = lambda_[index[-1]], delta[index]
    if method == "zoh":
      lambda_bar[index] = np.exp(lam * dt)
      b_scale[index] = (lambda_bar[index] - 1.0) / lam
    elif method == "bilinear":
      lambda_bar[index] = (1.0 + dt * lam / 2.0) / (1.0 - dt * lam / 2.0)
      b_scale[index] = dt / (1.0 - dt * lam / 2.0)
    else:
      raise ValueError(f"unknown method {method!r}")
  return lambda_bar, b_scale[..., None] * b_tilde


# ----------------------------------------------------------------------------- recurrence

def ssm_loop(lambda_bar, b_bar, c_tilde, u, *, conj_sym, bidirectional, d=None, reset=None):
  """Run the discretized SSM step by step.

  lambda_bar: (P',) or (B, L, P') complex; b_bar: (P', H) or (B, L, P', H) complex;
  c_tilde: (H, P') or (H, 2P') complex; u: (B, L, H) real; d: (H,) real; reset: (B, L) bool.
  Returns y (B, L, H) float64.
  """
  u = np.asarray(u, np.float64)
  batch, length, _ = u.shape
  lambda_bar = np.asarray(lambda_bar, np.complex128)
  b_bar = np.asarray(b_bar, np.complex128)
  c_tilde = np.asarray(c_tilde, np.complex128)
  num_states = lambda_bar.shape[-1]
  if lambda_bar.ndim == 1:
    lambda_bar = np.broadcast_to(lambda_bar, (batch, length, num_states))
  if b_bar.ndim == 2:
    b_bar = np.broadcast_to(b_bar, (batch, length) + b_bar.shape)
  keep = np.ones((batch, length)) if reset is None else 1.0 - np.asarray(reset, np.float64)

  def input_term(k):
    return np.einsum("bph,bh->bp", b_bar[:, k], u[:, k])

  forward = np.zeros((batch, length, num_states), np.complex128)
  state = np.zeros((batch, num_states), np.complex128)
  for k in range(length):
    state = lambda_bar[:, k] * state * keep[:, k, None] + input_term(k)
    forward[:, k] = state
  states = forward
  if bidirectional:
    backward = np.zeros_like(forward)
    state = np.zeros((batch, num_states), np.complex128)
    for k in reversed(range(length)):
      carried = state * keep[:, k + 1, None] if k + 1 < length else state
      state = lambda_bar[:, k] * carried + input_term(k)
      backward[:, k] = state
    states = np.concatenate([forward, backward], axis=-1)

  y = np.einsum("hp,blp->blh", c_tilde, states).real
  if conj_sym:
    y = 2.0 * y
  if d is not None:
    y = y + np.asarray(d, np.float64) * u
  return y


# ----------------------------------------------------------------------------- the layer

def layer_from_params(params, u, *, conj_sym, bidirectional, discretization, clip_eigs=False,
                      step_rescale=1.0, reset=None, intervals=None):
  """S5 layer output from its parameters (names/shapes of the paper's reference code).

  params: Lambda_re (P',), Lambda_im (P',), B (P', H, 2), C (H, P' or 2P', 2), D (H,),
  log_step (P', 1).
  u: (B, L, H); reset: (B, L) bool; intervals: (B, L) positive. Returns y (B, L, H) float64.
  """
  p = {name: np.asarray(value, np.float64) for name, value in params.items()}
  lambda_re = np.minimum(p["Lambda_re"], -1e-4) if clip_eigs else p["Lambda_re"]
  lambda_ = lambda_re + 1j * p["Lambda_im"]
  b_tilde = p["B"][..., 0] + 1j * p["B"][..., 1]
  c_tilde = p["C"][..., 0] + 1j * p["C"][..., 1]
  delta = step_rescale * np.exp(p["log_step"][:, 0])
  u = np.asarray(u, np.float64)
  if intervals is not None:
    delta = np.asarray(intervals, np.float64)[..., None] * delta  # (B, L, P')
  lambda_bar, b_bar = discretize(lambda_, b_tilde, delta, discretization)
  return ssm_loop(lambda_bar, b_bar, c_tilde, u, conj_sym=conj_sym, bidirectional=bidirectional,
                  d=p["D"], reset=reset)


def assert_close(actual, expected, rtol=1e-5):
  """float32 tolerance: rtol per element, atol rtol times the expected output's largest value."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol,
                             atol=rtol * np.max(np.abs(expected)))


# ----------------------------------------------------------------------------- linear recurrence

def loop_recurrence(a, b, keep=None, reverse=False):
  """a: (P,) or (..., L, P) complex; b: (..., L, P) complex; keep: (..., L) or None.

  Returns x (..., L, P) complex128, one explicit step at a time.
  """
  b = np.asarray(b, np.complex128)
  a = np.broadcast_to(np.asarray(a, np.complex128), b.shape)
  keep = np.ones(b.shape[:-1]) if keep is None else np.asarray(keep, np.float64)
  length = b.shape[-2]
  states = np.zeros_like(b)
  state = np.zeros(b.shape[:-2] + b.shape[-1:], np.complex128)
  for k in (reversed(range(length)) if reverse else range(length)):
    state = a[..., k, :] * keep[..., k, None] * state + b[..., k, :]
    states[..., k, :] = state
  return states


def planar(z):
  """(..., P) complex -> (..., 2, P) real [re; im], NumPy."""
  return np.stack([z.real, z.imag], axis=-2)


def unplanar(x):
  return x[..., 0, :] + 1j * x[..., 1, :]


def random_problem(rng, leading, length, num_states, *, varying, with_keep):
  """Stable multipliers (|a| in [0.8, 0.999], any phase), inputs, and a keep mask with resets."""
  a_shape = leading + (length, num_states) if varying else (num_states,)
  a = rng.uniform(0.8, 0.999, a_shape) * np.exp(1j * rng.uniform(-np.pi, np.pi, a_shape))
  b = rng.normal(size=leading + (length, num_states)) + 1j * rng.normal(
      size=leading + (length, num_states))
  keep = None
  if with_keep:
    keep = (rng.random(leading + (length,)) > 0.2).astype(np.float64)
    keep[..., length // 2] = 0.0  # at least one reset mid-sequence in every row
  return a, b, keep


def weighted_state_sum(weights, keep, reverse):
  """The loss L(a, b) = Σ weights · planar(x) of the loop recurrence, on planar a and b."""
  def loss(a_planar, b_planar):
    return np.sum(weights * planar(loop_recurrence(unplanar(a_planar), unplanar(b_planar), keep,
                                                   reverse)))
  return loss


def assert_gradients_match_finite_differences(loss, point, gradients, eps=1e-6):
  """Every coordinate of each gradient of loss at point (a tuple of arrays), against central
  differences of the float64 loss."""
  for which, analytic in enumerate(gradients):
    numeric = np.zeros(point[which].shape)
    for index in np.ndindex(numeric.shape):
      plus, minus = [p.copy() for p in point], [p.copy() for p in point]
      plus[which][index] += eps
      minus[which][index] -= eps
      numeric[index] = (loss(*plus) - loss(*minus)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(analytic), numeric, rtol=1e-6,
                               atol=1e-7 * np.max(np.abs(numeric)))


def assert_recurrence_gradients(recurrence, a, b, keep, reverse, weights):
  """A float64 JAX recurrence(a_planar, b_planar, keep) -> planar states: its loss
  L = Σ weights · states equals the loop's, and every coordinate of dL/da and dL/db equals
  central differences of the loop's loss."""
  a_planar, b_planar = planar(a), planar(b)
  oracle_loss = weighted_state_sum(weights, keep, reverse)
  with jax.enable_x64(True):
    keep_jax = None if keep is None else jnp.asarray(keep)
    value, gradients = jax.jit(jax.value_and_grad(
        lambda a_, b_: jnp.sum(recurrence(a_, b_, keep_jax) * weights), argnums=(0, 1)))(
            jnp.asarray(a_planar), jnp.asarray(b_planar))
    assert all(g.dtype == jnp.float64 for g in gradients)
  np.testing.assert_allclose(float(value), oracle_loss(a_planar, b_planar), rtol=1e-12)
  assert_gradients_match_finite_differences(oracle_loss, (a_planar, b_planar), gradients)
