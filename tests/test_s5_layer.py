"""The Flax S5 layer against the float64 NumPy oracle (tests/ssm_oracle.py).

The oracle gets the layer's own parameters (inputs, not outputs) and recomputes the layer from
docs/design.md, "The recurrence": clip, discretize, loop over time, read out.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s5scale import ssm
from s5scale.nn.s5 import S5
from s5scale.ssm.init import C_INITS
from tests import ssm_oracle as oracle
from tests.ssm_oracle import assert_close

H, P, BATCH, LENGTH = 8, 16, 2, 64
SCAN_IMPLS = ["auto", "reference"]


def random_inputs(seed, batch=BATCH, length=LENGTH, features=H, dtype=np.float32):
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(batch, length, features)).astype(dtype)
  reset = rng.random((batch, length)) < 0.1
  reset[:, length // 2] = True
  intervals = rng.uniform(0.5, 2.0, (batch, length)).astype(dtype)
  return u, reset, intervals


def init_layer(layer, u, seed):
  """Plain arrays: the layer may box its params with sharding metadata."""
  return nn.meta.unbox(layer.init(jax.random.key(seed), u))


def numpy_params(variables):
  return {name: np.asarray(value) for name, value in variables["params"].items()}


def with_params(variables, **replaced):
  params = dict(variables["params"])
  params.update({name: jnp.asarray(value) for name, value in replaced.items()})
  return {**variables, "params": params}


def oracle_output(layer, variables, u, reset=None, intervals=None, step_rescale=None):
  return oracle.layer_from_params(
      numpy_params(variables), u, conj_sym=layer.conj_sym, bidirectional=layer.bidirectional,
      discretization=layer.discretization, clip_eigs=layer.clip_eigs,
      step_rescale=layer.step_rescale if step_rescale is None else step_rescale, reset=reset,
      intervals=intervals)


def init_cheaply(layer, u, seed):
  """Params for `layer`, initialised through its reference-scan twin: init runs a forward pass,
  and the default scan (auto) costs a fresh trace per configuration. The params do not depend on
  the scan (test_init_does_not_depend_on_the_scan)."""
  return init_layer(layer.clone(scan_impl="reference"), u, seed)


def ssm_part_is_significant(variables, u, expected):
  """Guard against tests that cannot fail: the SSM term must dwarf the tolerance next to D u."""
  ssm_term = expected - np.asarray(variables["params"]["D"], np.float64) * u
  return np.max(np.abs(ssm_term)) > 1e-2 * np.max(np.abs(expected))


# ----------------------------------------------------------------------------- parallel mode

def forward_combos():
  """Every combination for the reference scan. The default scan (auto) costs a fresh compile per
  configuration, so it gets every combination of the flags that reach the scan itself
  (conj_sym, bidirectional) crossed with the discretization, while clip_eigs, the C init and
  the blocks (which only change Lambda, B, C before the scan) rotate through their values."""
  combos = [combo + ("reference",) for combo in itertools.product(
      [True, False], [False, True], ["zoh", "bilinear"], C_INITS, [False, True], [1, 4])]
  for i, (conj_sym, bidirectional, discretization) in enumerate(
      itertools.product([True, False], [False, True], ["zoh", "bilinear"])):
    combos.append((conj_sym, bidirectional, discretization, C_INITS[i % 3], i % 2 == 0,
                   [1, 4][i // 2 % 2], "auto"))
  return combos


@pytest.mark.parametrize("conj_sym,bidirectional,discretization,c_init,clip_eigs,blocks,scan_impl",
                         forward_combos())
def test_layer_matches_oracle(conj_sym, bidirectional, discretization, c_init, clip_eigs, blocks,
                              scan_impl):
  layer = S5(d_model=H, ssm_size=P, blocks=blocks, conj_sym=conj_sym, bidirectional=bidirectional,
             discretization=discretization, c_init=c_init, clip_eigs=clip_eigs,
             scan_impl=scan_impl)
  u, _, _ = random_inputs(0)
  variables = init_cheaply(layer, u, 1)
  num_states = P // 2 if conj_sym else P
  shapes = {name: value.shape for name, value in variables["params"].items()}
  assert shapes == {
      "Lambda_re": (num_states,), "Lambda_im": (num_states,), "B": (num_states, H, 2),
      "C": (H, 2 * num_states if bidirectional else num_states, 2), "D": (H,),
      "log_step": (num_states, 1)}

  # Some eigenvalues unstable or barely stable: clip_eigs must move them to -1e-4, and without
  # clip_eigs they must be left alone.
  lambda_re = np.array(variables["params"]["Lambda_re"])
  lambda_re[::3] = 0.3
  lambda_re[1::3] = -3e-5
  variables = with_params(variables, Lambda_re=lambda_re)
  expected = oracle_output(layer, variables, u)
  y = layer.apply(variables, u)
  assert y.shape == u.shape and y.dtype == jnp.float32
  assert_close(y, expected)
  assert ssm_part_is_significant(variables, u, expected)
  other = oracle.layer_from_params(numpy_params(variables), u, conj_sym=conj_sym,
                                   bidirectional=bidirectional, discretization=discretization,
                                   clip_eigs=not clip_eigs)
  assert np.max(np.abs(other - expected)) > 1e-3 * np.max(np.abs(expected))  # clipping matters


# Reference scan: resets and intervals alone and together; default scan: together (one compile
# each).
RESET_COMBOS = [combo + (extra, "reference") for combo, extra in itertools.product(
    itertools.product([True, False], [False, True], ["zoh", "bilinear"]),
    ["reset", "intervals", "both"])]
RESET_COMBOS += [(True, False, "zoh", "both", "auto"),
                 (True, True, "bilinear", "both", "auto"),
                 (False, False, "bilinear", "both", "auto"),
                 (False, True, "zoh", "both", "auto")]


@pytest.mark.parametrize("conj_sym,bidirectional,discretization,extra,scan_impl", RESET_COMBOS)
def test_layer_with_resets_and_intervals(conj_sym, bidirectional, discretization, extra,
                                         scan_impl):
  layer = S5(d_model=H, ssm_size=P, blocks=2, conj_sym=conj_sym, bidirectional=bidirectional,
             discretization=discretization, scan_impl=scan_impl, step_rescale=1.5)
  u, reset, intervals = random_inputs(2)
  reset = reset if extra in ("reset", "both") else None
  intervals = intervals if extra in ("intervals", "both") else None
  variables = init_cheaply(layer, u, 3)
  # Slow eigenvalues, so state is carried far and resets change the output visibly.
  variables = with_params(variables, Lambda_re=np.full(P // 2 if conj_sym else P, -0.05))
  expected = oracle_output(layer, variables, u, reset, intervals)
  y = layer.apply(variables, u, reset=None if reset is None else jnp.asarray(reset),
                  intervals=None if intervals is None else jnp.asarray(intervals))
  assert_close(y, expected)
  plain = oracle_output(layer, variables, u)
  assert np.max(np.abs(plain - expected)) > 1e-3 * np.max(np.abs(expected))


@pytest.mark.parametrize("discretization,scan_impl", [("zoh", "auto"),
                                                      ("bilinear", "reference")])
def test_interval_two_equals_step_rescale_two(discretization, scan_impl):
  u, _, _ = random_inputs(4)
  layer = S5(d_model=H, ssm_size=P, blocks=2, discretization=discretization, scan_impl=scan_impl)
  rescaled = layer.clone(step_rescale=2.0)
  variables = init_cheaply(layer, u, 5)
  y_intervals = layer.apply(variables, u, intervals=jnp.full(u.shape[:2], 2.0))
  y_rescaled = rescaled.apply(variables, u)
  expected = oracle_output(layer, variables, u, step_rescale=2.0)
  assert_close(y_intervals, expected)
  assert_close(y_rescaled, expected)
  np.testing.assert_allclose(np.asarray(y_intervals), np.asarray(y_rescaled), rtol=1e-6,
                             atol=1e-6 * np.max(np.abs(expected)))
  unscaled = oracle_output(layer, variables, u)
  assert np.max(np.abs(unscaled - expected)) > 1e-3 * np.max(np.abs(expected))


# ----------------------------------------------------------------------------- recurrent mode

def run_steps(layer, variables, u, intervals=None):
  """y (B, L, H) from S5.step, one time step at a time under lax.scan."""
  state0 = layer.apply(variables, u.shape[0], method=S5.initial_state)

  def one_step(state, inputs):
    u_t, interval_t = inputs
    return layer.apply(variables, state, u_t, interval_t, method=S5.step)

  time_major = jnp.swapaxes(jnp.asarray(u), 0, 1)
  per_step_intervals = None if intervals is None else jnp.swapaxes(jnp.asarray(intervals), 0, 1)
  _, ys = jax.jit(lambda s, xs: jax.lax.scan(one_step, s, xs))(
      state0, (time_major, per_step_intervals))
  return jnp.swapaxes(ys, 0, 1)


@pytest.mark.parametrize("conj_sym,discretization,scan_impl",
                         [(True, "zoh", "auto"), (False, "bilinear", "reference")])
def test_recurrent_2000_steps_match_parallel(conj_sym, discretization, scan_impl):
  layer = S5(d_model=H, ssm_size=P, blocks=2, conj_sym=conj_sym, discretization=discretization,
             scan_impl=scan_impl)
  u, _, _ = random_inputs(6, length=2000)
  variables = init_cheaply(layer, u[:, :LENGTH], 7)
  state0 = layer.apply(variables, BATCH, method=S5.initial_state)
  num_states = P // 2 if conj_sym else P
  assert state0.shape == (BATCH, num_states) and jnp.iscomplexobj(state0)
  np.testing.assert_array_equal(np.asarray(state0), 0)

  y_parallel = jax.jit(layer.apply)(variables, u)
  y_recurrent = run_steps(layer, variables, u)
  expected = oracle_output(layer, variables, u)
  assert_close(y_parallel, expected)
  assert_close(y_recurrent, expected)
  assert_close(y_recurrent, y_parallel)


@pytest.mark.parametrize("conj_sym,discretization", [(True, "zoh"), (False, "bilinear")])
def test_recurrent_steps_with_intervals(conj_sym, discretization):
  """Per-step intervals in recurrent mode (the parallel side is test_layer_with_resets_...)."""
  layer = S5(d_model=H, ssm_size=P, blocks=4, conj_sym=conj_sym, discretization=discretization)
  u, _, intervals = random_inputs(8)
  variables = init_cheaply(layer, u, 9)
  expected = oracle_output(layer, variables, u, intervals=intervals)
  assert_close(run_steps(layer, variables, u, intervals), expected)
  plain = oracle_output(layer, variables, u)
  assert np.max(np.abs(plain - expected)) > 1e-3 * np.max(np.abs(expected))


# ----------------------------------------------------------------------------- initialization

@pytest.mark.parametrize("conj_sym", [True, False])
@pytest.mark.parametrize("blocks", [1, 4])
def test_init_follows_the_paper(conj_sym, blocks):
  dt_min, dt_max = 2e-3, 5e-2
  layer = S5(d_model=H, ssm_size=P, blocks=blocks, conj_sym=conj_sym, dt_min=dt_min,
             dt_max=dt_max)
  u, _, _ = random_inputs(10)
  params = numpy_params(init_cheaply(layer, u, 11))
  assert all(value.dtype == np.float32 for value in params.values())
  lambda_ = params["Lambda_re"] + 1j * params["Lambda_im"]
  assert_close(lambda_, oracle.block_hippo_lambda(P, blocks, conj_sym))
  log_step = params["log_step"][:, 0]
  assert np.all(log_step >= np.log(dt_min) - 1e-6) and np.all(log_step <= np.log(dt_max) + 1e-6)
  assert np.ptp(log_step) > 0.1 * (np.log(dt_max) - np.log(dt_min))  # drawn, not constant
  if not conj_sym:
    # B_tilde = V^-1 B with B real: mapping back through V gives a real matrix.
    _, v, _ = ssm.make_block_hippo(P, blocks, conj_sym)
    b_real = np.asarray(v) @ (params["B"][..., 0] + 1j * params["B"][..., 1])
    np.testing.assert_allclose(b_real.imag, 0, atol=1e-5 * np.max(np.abs(b_real)))
    assert np.max(np.abs(b_real.real)) > 0.1


def test_init_does_not_depend_on_the_scan():
  """What init_cheaply relies on, checked once: same key, same params, whichever scan."""
  layer = S5(d_model=H, ssm_size=P, blocks=2, bidirectional=True, c_init="lecun_normal")
  u, _, _ = random_inputs(22)
  default, reference = init_layer(layer, u, 23), init_cheaply(layer, u, 23)
  for name, value in default["params"].items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(reference["params"][name]))


def test_complex_normal_c_init_has_half_variance_per_part():
  layer = S5(d_model=H, ssm_size=P, c_init="complex_normal")
  u, _, _ = random_inputs(12)
  c = np.stack([init_cheaply(layer, u, seed)["params"]["C"] for seed in range(20)])
  assert c.shape == (20, H, P // 2, 2)
  np.testing.assert_allclose(c.std(axis=(0, 1, 2)), np.sqrt(0.5), rtol=0.05)
  np.testing.assert_allclose(c.mean(axis=(0, 1, 2)), 0, atol=0.05)


# ----------------------------------------------------------------------------- gradients

def test_gradients_are_finite():
  """float32, every feature on, through the default scan (auto) that training uses."""
  layer = S5(d_model=H, ssm_size=P, blocks=2, bidirectional=True, clip_eigs=True)
  u, reset, intervals = random_inputs(14)
  variables = init_cheaply(layer, u, 15)
  weights = np.random.default_rng(16).normal(size=u.shape)

  def loss(params):
    y = layer.apply({"params": params}, u, reset=jnp.asarray(reset),
                    intervals=jnp.asarray(intervals))
    return jnp.sum(y * weights)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert set(grads) == set(variables["params"])
  for name, grad in grads.items():
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad)), name
    assert np.max(np.abs(grad)) > 0, name


# One tiny case (a float64 compile costs seconds): the default scan (auto), which defines its own
# backward pass, with every feature on. The reference scan's gradient is that of JAX's
# associative_scan.
GRADIENT_CASES = [(True, True, "zoh", "auto")]


@pytest.mark.parametrize("conj_sym,bidirectional,discretization,scan_impl", GRADIENT_CASES)
def test_gradients_match_finite_differences_float64(conj_sym, bidirectional, discretization,
                                                    scan_impl):
  """jax.grad of the layer against central differences of the float64 oracle."""
  rng = np.random.default_rng(17)
  u, reset, intervals = random_inputs(18, batch=1, length=7, features=3, dtype=np.float64)
  reset[0, 2] = True
  weights = rng.normal(size=u.shape)
  layer = S5(d_model=3, ssm_size=4, blocks=2, conj_sym=conj_sym, bidirectional=bidirectional,
             discretization=discretization, clip_eigs=True, scan_impl=scan_impl,
             param_dtype=jnp.float64)
  with jax.enable_x64(True):
    reset_jax, intervals_jax = jnp.asarray(reset), jnp.asarray(intervals)  # float64 inside x64
    variables = init_cheaply(layer, u, 19)
    assert all(value.dtype == jnp.float64 for value in variables["params"].values())
    # Steps long enough that every parameter moves the 7-step output by more than rounding.
    num_states = variables["params"]["log_step"].shape[0]
    variables = with_params(variables, log_step=rng.uniform(np.log(0.05), np.log(0.5),
                                                            (num_states, 1)))

    def loss(params):
      y = layer.apply({"params": params}, u, reset=reset_jax, intervals=intervals_jax)
      return jnp.sum(y * weights), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    assert y.dtype == jnp.float64
    grads = {name: np.asarray(grad) for name, grad in grads.items()}
  params = numpy_params(variables)
  expected = oracle_output(layer, variables, u, reset, intervals)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-10, atol=1e-12)

  def oracle_loss(params):
    y = oracle.layer_from_params(params, u, conj_sym=conj_sym, bidirectional=bidirectional,
                                 discretization=discretization, clip_eigs=True, reset=reset,
                                 intervals=intervals)
    return np.sum(y * weights)

  eps = 1e-5
  rounding = 1e-14 * np.sum(np.abs(expected * weights)) / eps  # float64 noise in the differences
  for name, value in params.items():
    for _ in range(2):
      direction = rng.normal(size=value.shape)
      plus = oracle_loss({**params, name: value + eps * direction})
      minus = oracle_loss({**params, name: value - eps * direction})
      numeric = (plus - minus) / (2 * eps)
      analytic = np.sum(grads[name] * direction)
      scale = np.sum(np.abs(grads[name] * direction))
      assert scale > 1e3 * rounding, name  # the parameter visibly matters
      assert abs(numeric - analytic) <= 1e-6 * scale + rounding, (name, numeric, analytic)


# ----------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("kwargs,argument", [
    (dict(ssm_size=15), "ssm_size"),
    (dict(ssm_size=16, blocks=3), "blocks"),
    (dict(ssm_size=12, blocks=4), "ssm_size|blocks"),  # odd per-block size with conj_sym
    (dict(dt_min=0.0), "dt_min"),
    (dict(dt_min=-1e-3), "dt_min"),
    (dict(dt_min=0.2, dt_max=0.1), "dt_min|dt_max"),
    (dict(discretization="euler"), "discretization"),
    (dict(c_init="orthogonal"), "c_init"),
    (dict(scan_impl="fastest"), "scan_impl"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, argument):
  layer = S5(**{"d_model": H, "ssm_size": P, **kwargs})
  u, _, _ = random_inputs(20, length=4)
  with pytest.raises(ValueError, match=argument):
    init_layer(layer, u, 0)


@pytest.mark.parametrize("ssm_size,blocks", [(15, 1), (16, 3), (12, 4)])
def test_make_block_hippo_rejects_bad_sizes(ssm_size, blocks):
  with pytest.raises(ValueError, match="ssm_size|blocks"):
    ssm.make_block_hippo(ssm_size, blocks, True)
