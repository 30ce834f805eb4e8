"""Carried state (issue 27): one long sequence run window by window, each window entering with
the state the previous one left, equals one pass over the whole sequence.

Oracles, independent of s5scale's scans: a float64 NumPy loop over time from an initial state
(S5's recurrence and S4D's), and, for gradients "up to the truncation", a JAX loop over time that
stops the gradient of the state at the window boundaries. Resets fall inside windows, exactly on
a window's first step and on a window's last step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from s5scale import ssm
from s5scale.nn.model import S5Model, zero_states
from s5scale.ssm.planar_complex import to_planar
from tests import s4d_oracle
from tests.helpers import tiny_config

H, P, BATCH = 3, 4, 2
WINDOWS = (12, 12, 12, 12)          # S5: equal windows (the context-parallel split needs it)
S4D_WINDOWS = (20, 16, 24)          # S4D: 20 and 24 pad the last chunk of 16, 16 does not
RESETS = (5, 12, 23, 36)            # inside, on a window's first step, on a window's last step
RTOL = 1e-10


def _resets(length, windows):
  reset = np.zeros((BATCH, length), bool)
  reset[0, [r for r in RESETS if r < length]] = True
  starts = np.cumsum((0,) + windows[:-1])
  reset[1, starts[1]] = True                         # row 1: only a window start and an end
  reset[1, starts[2] - 1] = True
  return reset


def assert_close(actual, expected, rtol=RTOL):
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol,
                             atol=rtol * np.max(np.abs(expected)))


def _windowed(run, windows, state, *arrays):
  """Concatenated outputs of run(state, *window slices) -> (y, state), and the last state."""
  outputs, start = [], 0
  for width in windows:
    y, state = run(state, *[a[:, start:start + width] for a in arrays])
    outputs.append(y)
    start += width
  return np.concatenate(outputs, axis=1), np.asarray(state)


# ----------------------------------------------------------------------------- oracles

def loop(a, f, c, d, u, reset, h0, readout):
  """x_k = a keep_k x_{k−1} + f(u_k) from x_{−1} = h0; y_k = readout(c, x_k) + d u_k (d None:
  no feedthrough). NumPy."""
  state, ys = np.asarray(h0, np.complex128), []
  for k in range(u.shape[1]):
    state = a * state * (1.0 - reset[:, k]).reshape((-1,) + (1,) * (state.ndim - 1)) + f(u[:, k])
    ys.append(readout(c, state) + (0 if d is None else d * u[:, k]))
  return np.stack(ys, axis=1), state


def s5_oracle(lambda_bar, b_bar, c_tilde, d, u, reset, h0):
  return loop(lambda_bar, lambda u_k: u_k @ b_bar.T, c_tilde, d, u, reset, h0,
              lambda c, x: 2 * (x @ c.T).real)


def s4d_oracle_loop(lambda_, c, log_step, d, u, reset, h0):
  lambda_bar = np.exp(np.exp(log_step)[:, None] * lambda_)
  factor = (lambda_bar - 1) / lambda_
  return loop(lambda_bar, lambda u_k: factor * u_k[..., None], c, d, u, reset, h0,
              lambda c, x: 2 * np.sum(c * x, axis=-1).real)


def _s5_problem(seed, length):
  rng = np.random.default_rng(seed)
  lambda_bar = rng.uniform(0.85, 0.99, P) * np.exp(1j * rng.uniform(-np.pi, np.pi, P))
  b_bar = rng.normal(size=(P, H)) + 1j * rng.normal(size=(P, H))
  c_tilde = rng.normal(size=(H, P)) + 1j * rng.normal(size=(H, P))
  d = rng.normal(size=H)
  u = rng.normal(size=(BATCH, length, H))
  h0 = rng.normal(size=(BATCH, P)) + 1j * rng.normal(size=(BATCH, P))
  return lambda_bar, b_bar, c_tilde, d, u, h0


def _s4d_problem(seed, length, n=4):
  rng = np.random.default_rng(seed)
  lambda_ = np.tile(s4d_oracle.lambda_init(2 * n, "legs"), (H, 1))
  c = rng.normal(size=(H, n)) + 1j * rng.normal(size=(H, n))
  log_step = np.log(rng.uniform(0.05, 0.3, H))
  d = rng.normal(size=H)
  u = rng.normal(size=(BATCH, length, H))
  h0 = rng.normal(size=(BATCH, H, n)) + 1j * rng.normal(size=(BATCH, H, n))
  return lambda_, c, log_step, d, u, h0


# ----------------------------------------------------------------------------- S5 forward

@pytest.mark.parametrize("impl", ["chunked", "reference", "auto"])
def test_s5_windows_equal_one_pass_and_the_loop(impl):
  length = sum(WINDOWS)
  reset = _resets(length, WINDOWS)
  with jax.enable_x64(True):
    lambda_bar, b_bar, c_tilde, d, u, h0 = _s5_problem(0, length)
    expected, expected_final = s5_oracle(lambda_bar, b_bar, c_tilde, d, u, reset, h0)
    apply = jax.jit(lambda state, u_w, reset_w: ssm.apply_ssm(
        lambda_bar, b_bar, c_tilde, u_w, conj_sym=True, bidirectional=False, D=d, reset=reset_w,
        impl=impl, initial_state=state))
    y, final = _windowed(apply, WINDOWS, jnp.asarray(h0), u, reset)
    whole, whole_final = apply(jnp.asarray(h0), u, reset)
  assert_close(y, expected)
  assert_close(final, expected_final)
  assert_close(whole, expected)
  assert_close(whole_final, expected_final)


def assert_planar_windows_match_the_loop(impl, sharding=None, mesh=None):
  """The planar recurrence window by window (S5's states as the readout) vs the loop."""
  length = sum(WINDOWS)
  reset = _resets(length, WINDOWS)
  with jax.enable_x64(True):
    lambda_bar, b_bar, _, _, u, h0 = _s5_problem(1, length)
    bu = to_planar(u @ b_bar.T)

    def run(state, bu_w, reset_w):
      states = ssm.linear_recurrence_planar(
          to_planar(lambda_bar), bu_w, 1.0 - reset_w, impl=impl,
          interpret=impl == "pallas", sharding=sharding, initial_state=state)
      return states, states[:, -1]

    if mesh is None:
      states, final = _windowed(jax.jit(run), WINDOWS, to_planar(h0), bu,
                                reset)
    else:
      with jax.set_mesh(mesh):
        states, final = _windowed(jax.jit(run), WINDOWS, to_planar(h0), bu,
                                  reset)
    expected, expected_final = loop(lambda_bar, lambda u_k: u_k @ b_bar.T, None, None, u, reset,
                                    h0, lambda c, x: x)
  assert_close(states[:, :, 0] + 1j * states[:, :, 1], expected)
  assert_close(final[:, 0] + 1j * final[:, 1], expected_final)


def test_pallas_interpreted_windows_equal_the_loop():
  assert_planar_windows_match_the_loop("pallas")


@pytest.mark.parametrize("context", [2, 4])
def test_context_parallel_windows_equal_the_loop(context):
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(8 // context, context), ("data", "context"))
  assert_planar_windows_match_the_loop("chunked", PartitionSpec("data", "context", None, None), mesh)


def test_refused_without_a_causal_direction():
  with jax.enable_x64(True):
    lambda_bar, b_bar, c_tilde, d, u, h0 = _s5_problem(2, 8)
    with pytest.raises(ValueError, match="bidirectional"):
      ssm.apply_ssm(lambda_bar, b_bar, np.concatenate([c_tilde, c_tilde], 1), u, conj_sym=True,
                    bidirectional=True, initial_state=h0)
    with pytest.raises(ValueError, match="reverse"):
      planar = to_planar
      ssm.linear_recurrence_planar(planar(lambda_bar), planar(u @ b_bar.T), reverse=True,
                                   initial_state=planar(h0))


# ----------------------------------------------------------------------------- S4D forward

@pytest.mark.parametrize("form", ["conv", "chunked", "recurrence"])
def test_s4d_windows_equal_one_pass_and_the_loop(form):
  length = sum(S4D_WINDOWS)
  reset = _resets(length, S4D_WINDOWS)
  with jax.enable_x64(True):
    lambda_, c, log_step, d, u, h0 = _s4d_problem(3, length)
    no_reset = np.zeros_like(reset)
    oracle_reset = no_reset if form == "conv" else reset   # a convolution has no resets
    expected, expected_final = s4d_oracle_loop(lambda_, c, log_step, d, u, oracle_reset, h0)
    function = {"conv": ssm.s4d_conv, "chunked": ssm.s4d_chunked,
                "recurrence": ssm.s4d_recurrence}[form]

    def run(state, u_w, reset_w):
      resets = {} if form == "conv" else dict(reset=reset_w)
      return function(lambda_, c, log_step, u_w, bidirectional=False, D=d, initial_state=state,
                      **resets)

    y, final = _windowed(jax.jit(run), S4D_WINDOWS, jnp.asarray(h0), u, reset)
  assert_close(y, expected)
  assert_close(final, expected_final)


def test_s4d_conv_with_time_split_runs_chunked_and_carries():
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "context"))
  windows = (32, 32)
  reset = np.zeros((BATCH, 64), bool)
  with jax.enable_x64(True):
    lambda_, c, log_step, d, u, h0 = _s4d_problem(4, 64)
    expected, expected_final = s4d_oracle_loop(lambda_, c, log_step, d, u, reset, h0)
    run = jax.jit(lambda state, u_w: ssm.s4d_conv(
        lambda_, c, log_step, u_w, bidirectional=False, D=d, initial_state=state,
        sharding=PartitionSpec("data", "context", None, None)))
    with jax.set_mesh(mesh):
      y, final = _windowed(run, windows, jnp.asarray(h0), u)
  assert_close(y, expected)
  assert_close(final, expected_final)


# ----------------------------------------------------------------------------- gradients

def _truncated_loss(step, params, u, weights, windows, state):
  """Oracle: Σ weights·y of a JAX loop over time whose state's gradient stops at each window
  boundary (the truncation that carried-state training makes)."""
  boundary = np.isin(np.arange(u.shape[1]), np.cumsum(windows)[:-1])

  def one_step(state, inputs):
    u_k, weights_k, at_boundary = inputs
    state = jnp.where(at_boundary, jax.lax.stop_gradient(state), state)
    state, y_k = step(params, state, u_k)
    return state, jnp.sum(weights_k * y_k)

  _, terms = jax.lax.scan(one_step, state, (jnp.swapaxes(u, 0, 1), np.swapaxes(weights, 0, 1),
                                            boundary))
  return jnp.sum(terms)


def _windowed_loss(apply, params, u, weights, windows, state):
  total, start = 0.0, 0
  for width in windows:
    y, state = apply(params, jax.lax.stop_gradient(state), u[:, start:start + width])
    total = total + jnp.sum(weights[:, start:start + width] * y)
    start += width
  return total


def _assert_same_gradients(apply, step, params, u, windows, h0):
  weights = np.random.default_rng(9).normal(size=u.shape)
  expected = jax.jit(jax.grad(lambda p, x: _truncated_loss(step, p, x, weights, windows, h0),
                              argnums=(0, 1)))(params, u)
  actual = jax.jit(jax.grad(lambda p, x: _windowed_loss(apply, p, x, weights, windows, h0),
                            argnums=(0, 1)))(params, u)
  for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert_close(got, want, rtol=1e-9)
  # The truncation matters: without it the gradient differs (the test could fail).
  full = jax.jit(jax.grad(lambda p: _windowed_loss(apply, p, u, weights, (u.shape[1],), h0)))(
      params)
  assert not all(np.allclose(a, b, rtol=1e-6) for a, b in zip(jax.tree.leaves(full),
                                                             jax.tree.leaves(expected[0])))


def test_s5_chunked_gradients_equal_the_truncated_loop():
  with jax.enable_x64(True):
    lambda_bar, b_bar, c_tilde, d, u, h0 = _s5_problem(5, sum(WINDOWS))
    params = dict(log_a=jnp.log(jnp.asarray(lambda_bar)), b=jnp.asarray(b_bar),
                  c=jnp.asarray(c_tilde), d=jnp.asarray(d))
    real = lambda p: {k: (v.real, v.imag) if jnp.iscomplexobj(v) else v for k, v in p.items()}
    unreal = lambda p: {k: v[0] + 1j * v[1] if isinstance(v, tuple) else v for k, v in p.items()}

    def apply(p, state, u_w):
      p = unreal(p)
      return ssm.apply_ssm(jnp.exp(p["log_a"]), p["b"], p["c"], u_w, conj_sym=True,
                           bidirectional=False, D=p["d"], impl="chunked", initial_state=state)

    def step(p, state, u_k):
      p = unreal(p)
      return ssm.step(jnp.exp(p["log_a"]), p["b"], p["c"], state, u_k, conj_sym=True, D=p["d"])

    _assert_same_gradients(apply, step, real(params), jnp.asarray(u), WINDOWS, jnp.asarray(h0))


def test_s4d_conv_gradients_equal_the_truncated_loop():
  with jax.enable_x64(True):
    lambda_, c, log_step, d, u, h0 = _s4d_problem(6, sum(S4D_WINDOWS))
    params = dict(lambda_re=jnp.asarray(lambda_.real), lambda_im=jnp.asarray(lambda_.imag),
                  c_re=jnp.asarray(c.real), c_im=jnp.asarray(c.imag),
                  log_step=jnp.asarray(log_step), d=jnp.asarray(d))
    system = lambda p: (p["lambda_re"] + 1j * p["lambda_im"], p["c_re"] + 1j * p["c_im"])

    def apply(p, state, u_w):
      lam, cc = system(p)
      return ssm.s4d_conv(lam, cc, p["log_step"], u_w, bidirectional=False, D=p["d"],
                          initial_state=state)

    def step(p, state, u_k):
      lam, cc = system(p)
      return ssm.s4d_step(lam, cc, p["log_step"], state, u_k, D=p["d"])

    _assert_same_gradients(apply, step, params, jnp.asarray(u), S4D_WINDOWS, jnp.asarray(h0))


# ----------------------------------------------------------------------------- the model

@pytest.mark.parametrize("layer,remat", [("s5", "none"), ("s4d", "full")])
def test_model_windows_equal_one_pass(layer, remat):
  # The reference scan compiles fastest; the impls have their own tests above.
  config = tiny_config(model__layer=layer, model__scan_layers=True, model__remat=remat,
                       model__scan_impl="reference", model__num_layers=2)
  config.model.vocab_size = 256
  windows = WINDOWS[:3]              # equal widths: one compile
  tokens = np.random.default_rng(7).integers(0, 256, (BATCH, sum(windows))).astype(np.int32)
  reset = _resets(sum(windows), windows)
  with jax.enable_x64(True):
    model = S5Model.from_config(config.model, compute_dtype=jnp.float64,
                                residual_dtype=jnp.float64)
    variables = model.init(jax.random.PRNGKey(0), tokens[:, :windows[0]])
    variables = jax.tree.map(lambda p: p.astype(jnp.float64), variables)
    whole = jax.jit(lambda t, r: model.apply(variables, t, reset=r))(tokens, reset)
    states = zero_states(config.model, BATCH)
    assert states.shape[:2] == (config.model.num_layers, BATCH)
    run = jax.jit(lambda s, t, r: model.apply(variables, t, reset=r, states=s))
    logits, final = _windowed(run, windows, states, tokens, reset)
    assert final.shape == states.shape
    with pytest.raises(ValueError, match="lm"):
      S5Model.from_config(tiny_config(model__task="classify", model__num_classes=3).model).init(
          jax.random.PRNGKey(0), tokens[:, :4], states=states)
  assert whole.dtype == np.float64
  assert_close(logits, whole, rtol=1e-9)
