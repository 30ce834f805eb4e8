"""Issue 16: S4D's pure math (s5scale.ssm.s4d) and layer (s5scale.nn.s4d).

Oracles: the float64 NumPy recurrence loop and closed-form kernel of tests/s4d_oracle.py, each
document run alone, and finite differences in float64.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import flatten_util

from s5scale import optim, ssm
from s5scale.nn.s4d import S4D
from tests import s4d_oracle as oracle
from tests.ssm_oracle import assert_close

H, N = 4, 16   # channels, N states per channel (N/2 = 8 complex)


def random_system(rng, init, bidirectional, num_features=H, state_size=N):
  """Λ from the init (same for every channel, as the layer starts), complex-normal C, log Δ in
  U[log 1e-3, log 1e-1]: complex64/float32."""
  lambda_ = np.tile(oracle.lambda_init(state_size, init), (num_features, 1))
  c_shape = ((2,) if bidirectional else ()) + lambda_.shape
  c = (rng.normal(size=c_shape) + 1j * rng.normal(size=c_shape)) * np.sqrt(0.5)
  log_step = rng.uniform(np.log(1e-3), np.log(1e-1), num_features)
  return lambda_.astype(np.complex64), c.astype(np.complex64), log_step.astype(np.float32)


# ----------------------------------------------------------------------------- oracle self-checks

def test_oracle_loop_impulse_response_is_the_closed_form_kernel():
  rng = np.random.default_rng(0)
  lambda_, c, log_step = random_system(rng, "legs", False)
  impulse = np.zeros((1, 30, H))
  impulse[0, 0] = 1.0
  response = oracle.s4d_loop(lambda_, c, log_step, impulse, bidirectional=False)[0].T
  np.testing.assert_allclose(response, oracle.kernel_closed_form(lambda_, c, log_step, 30),
                             rtol=1e-12, atol=1e-14)


def test_inits():
  np.testing.assert_allclose(ssm.make_s4d_lambda(8, "lin"), -0.5 + 1j * np.pi * np.arange(4),
                             rtol=1e-15)
  legs = ssm.make_s4d_lambda(N, "legs")
  np.testing.assert_allclose(legs, oracle.lambda_init(N, "legs"), rtol=1e-10)
  np.testing.assert_allclose(legs.real, -0.5, rtol=1e-12)
  # Conjugate pairs kept once: the kept half and its conjugates are HiPPO-N's whole spectrum.
  full = np.sort_complex(np.concatenate([legs, legs.conj()]))
  np.testing.assert_allclose(full, np.sort_complex(ssm.make_dplr_hippo(N)[0]), atol=1e-9)


# ----------------------------------------------------------------------------- kernel + conv

# (init, bidirectional, with D, step_rescale): both inits, both directions, D on and off, and a
# step_rescale other than 1, for every length.
CONV_CASES = [("legs", False, True, 1.0), ("lin", False, False, 0.5), ("legs", True, True, 2.0),
              ("lin", True, True, 1.0)]


@pytest.mark.parametrize("length", [1, 7, 1000, 4096])
@pytest.mark.parametrize("init,bidirectional,with_d,step_rescale", CONV_CASES,
                         ids=[f"{i}-bidir{int(b)}-d{int(d)}-rescale{r:g}"
                              for i, b, d, r in CONV_CASES])
def test_kernel_and_conv_match_the_loop(length, init, bidirectional, with_d, step_rescale):
  rng = np.random.default_rng(length)
  lambda_, c, log_step = random_system(rng, init, bidirectional)
  u = rng.normal(size=(2, length, H)).astype(np.float32)
  d = rng.normal(size=H).astype(np.float32) if with_d else None
  expected = oracle.s4d_loop(lambda_, c, log_step, u, bidirectional=bidirectional, d=d,
                             step_rescale=step_rescale)
  kernel = ssm.s4d_kernel(lambda_, c, log_step, length, step_rescale=step_rescale)
  assert kernel.shape == c.shape[:-1] + (length,) and kernel.dtype == jnp.float32
  if bidirectional:
    y = ssm.bidirectional_conv(u, kernel[0], kernel[1], d)
  else:
    y = ssm.causal_conv(u, kernel, d)
  assert y.shape == u.shape and y.dtype == jnp.float32
  assert_close(y, expected)
  if length == 1000:  # the kernel itself, against the closed form
    assert_close(kernel[0] if bidirectional else kernel,
                 oracle.kernel_closed_form(lambda_, c[0] if bidirectional else c, log_step, length,
                                           step_rescale))


def test_causal_conv_any_batch_dims_and_float64():
  rng = np.random.default_rng(1)
  lambda_, c, log_step = random_system(rng, "lin", False)
  u = rng.normal(size=(2, 3, 50, H))
  expected = oracle.s4d_loop(lambda_, c, log_step, u.reshape(6, 50, H), bidirectional=False)
  with jax.enable_x64(True):
    kernel = ssm.s4d_kernel(jnp.asarray(lambda_, jnp.complex128), jnp.asarray(c, jnp.complex128),
                            jnp.asarray(log_step, jnp.float64), 50)
    y = ssm.causal_conv(jnp.asarray(u), kernel)
    assert y.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(y).reshape(6, 50, H), expected, rtol=1e-9,
                             atol=1e-12 * np.max(np.abs(expected)))


# ----------------------------------------------------------------------------- chunked, with resets

# (length, chunk_size): one step; a length that is not a multiple of T; chunks of 1 and of the
# whole sequence; a document (or a reset) in every chunk and documents spanning many chunks.
CHUNK_CASES = [(1, 16), (7, 4), (300, 16), (300, 1), (64, 64), (1000, 16)]


# Jitted: run op by op, each call would compile every operation of the scan on its own.
S4D_CHUNKED = jax.jit(ssm.s4d_chunked, static_argnames=("bidirectional", "chunk_size"))
S4D_RECURRENCE = jax.jit(ssm.s4d_recurrence, static_argnames="bidirectional")


@pytest.mark.parametrize("length,chunk_size", CHUNK_CASES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_chunked_with_resets_matches_the_loop_and_the_recurrence(length, chunk_size, bidirectional):
  rng = np.random.default_rng(length + chunk_size)
  lambda_, c, log_step = random_system(rng, "legs", bidirectional)
  u = rng.normal(size=(2, length, H)).astype(np.float32)
  d = rng.normal(size=H).astype(np.float32)
  reset = rng.random((2, length)) < 0.03
  reset[1, : length // 3] = False         # one row: a long first document across chunks
  if length > 20:
    reset[0, 10:14] = True                # documents of one step, back to back
  expected = oracle.s4d_loop(lambda_, c, log_step, u, bidirectional=bidirectional, d=d,
                             step_rescale=0.5, reset=reset)
  chunked = S4D_CHUNKED(lambda_, c, log_step, u, bidirectional=bidirectional, reset=reset, D=d,
                        step_rescale=0.5, chunk_size=chunk_size)
  assert chunked.shape == u.shape and chunked.dtype == jnp.float32
  assert_close(chunked, expected)
  recurrence = S4D_RECURRENCE(lambda_, c, log_step, u, bidirectional=bidirectional,
                              reset=jnp.asarray(reset), D=d, step_rescale=0.5)
  assert_close(recurrence, expected)


def test_chunked_without_resets_is_the_convolution_in_float64():
  rng = np.random.default_rng(11)
  lambda_, c, log_step = random_system(rng, "lin", True)
  u = rng.normal(size=(3, 200, H))
  with jax.enable_x64(True):
    args = (jnp.asarray(lambda_, jnp.complex128), jnp.asarray(c, jnp.complex128),
            jnp.asarray(log_step, jnp.float64), jnp.asarray(u))
    chunked = S4D_CHUNKED(*args, bidirectional=True, reset=jnp.zeros((3, 200), bool))
    conv = jax.jit(ssm.s4d_conv, static_argnames="bidirectional")(*args, bidirectional=True)
    assert chunked.dtype == jnp.float64
  np.testing.assert_allclose(chunked, conv, rtol=1e-9, atol=1e-12 * np.max(np.abs(conv)))


# ----------------------------------------------------------------------------- three paths

def layer_and_params(bidirectional=False, init="legs", seed=0, dtype=jnp.float32, **kwargs):
  layer = S4D(d_model=H, state_size=N, lambda_init=init, bidirectional=bidirectional,
              param_dtype=dtype, **kwargs)
  variables = layer.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4, H), dtype))
  return layer, nn.unbox(variables)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrence_equals_fft_and_the_loop_with_intervals(bidirectional):
  rng = np.random.default_rng(2)
  layer, variables = layer_and_params(bidirectional, "lin")
  u = rng.normal(size=(2, 300, H)).astype(np.float32)
  apply = jax.jit(layer.apply)
  fft = apply(variables, u)
  recurrence = apply(variables, u, reset=jnp.zeros(u.shape[:2], bool))
  assert_close(recurrence, fft)
  params = variables["params"]
  lambda_ = np.asarray(params["Lambda_re"]) + 1j * np.asarray(params["Lambda_im"])
  c = np.asarray(params["C"][..., 0]) + 1j * np.asarray(params["C"][..., 1])
  expected = oracle.s4d_loop(lambda_, c, params["log_step"], u, bidirectional=bidirectional,
                             d=params["D"])
  assert_close(fft, expected)
  # Per-step intervals vary the system along time: only the recurrence expresses them.
  intervals = rng.uniform(0.5, 2.0, u.shape[:2]).astype(np.float32)
  varying = apply(variables, u, intervals=intervals)
  assert_close(varying, oracle.s4d_loop(lambda_, c, params["log_step"], u,
                                        bidirectional=bidirectional, d=params["D"],
                                        intervals=intervals))
  assert np.max(np.abs(varying - expected)) > 1e-2 * np.max(np.abs(expected))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_with_resets_each_document_equals_itself_alone(bidirectional):
  rng = np.random.default_rng(3)
  layer, variables = layer_and_params(bidirectional, "legs")
  starts = [0, 37, 38, 90, 151]          # documents of 37, 1, 52, 61 and 49 steps
  length = 200
  u = rng.normal(size=(1, length, H)).astype(np.float32)
  reset = np.zeros((1, length), bool)
  reset[0, starts] = True
  apply = jax.jit(layer.apply)
  packed = np.asarray(apply(variables, u, reset=jnp.asarray(reset)))
  for start, end in zip(starts, starts[1:] + [length]):
    alone = apply(variables, u[:, start:end])                # FFT path, no reset
    assert_close(packed[:, start:end], alone)
  unreset = apply(variables, u)
  assert np.max(np.abs(unreset - packed)) > 1e-2 * np.max(np.abs(packed))


def test_2000_recurrent_steps_equal_the_parallel_call():
  rng = np.random.default_rng(4)
  layer, variables = layer_and_params(False, "legs", step_rescale=0.5)
  u = rng.normal(size=(2, 2000, H)).astype(np.float32)
  state0 = layer.apply(variables, 2, method=S4D.initial_state)
  assert state0.shape == (2, H, N // 2)

  def one_step(state, u_t):
    return layer.apply(variables, state, u_t, method=S4D.step)

  final, ys = jax.lax.scan(one_step, state0, jnp.swapaxes(u, 0, 1))
  parallel = layer.apply(variables, u)
  assert_close(jnp.swapaxes(ys, 0, 1), parallel)
  carried_y, prefill = layer.apply(variables, u, initial_state=state0)
  assert_close(carried_y, parallel)
  assert_close(prefill, final)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradients_finite_for_every_parameter(bidirectional):
  rng = np.random.default_rng(5)
  layer, variables = layer_and_params(bidirectional)
  u = jnp.asarray(rng.normal(size=(2, 64, H)).astype(np.float32))
  reset = jnp.asarray(rng.random((2, 64)) < 0.1)
  for kwargs in ({}, {"reset": reset}):
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, u, **kwargs) ** 2)))(
        variables)["params"]
    assert set(grads) == {"Lambda_re", "Lambda_im", "C", "D", "log_step"}
    for name, grad in grads.items():
      assert np.all(np.isfinite(grad)), (name, kwargs)
      assert np.max(np.abs(grad)) > 0, (name, kwargs)


@pytest.mark.parametrize("path", ["fft", "chunked", "recurrence"])
def test_gradients_equal_finite_differences_float64(path):
  rng = np.random.default_rng(6)
  with jax.enable_x64(True):
    layer = S4D(d_model=2, state_size=4, bidirectional=True, param_dtype=jnp.float64)
    # 40 steps: three chunks of the chunked path's 16, a document across the first two.
    u = jnp.asarray(rng.normal(size=(1, 40, 2)))
    params = nn.unbox(layer.init(jax.random.PRNGKey(1), u))
    weights = jnp.asarray(rng.normal(size=u.shape))
    reset = None if path == "fft" else jnp.zeros((1, 40), bool).at[0, [3, 35]].set(True)
    # Per-step intervals are what sends the layer through the recurrence.
    intervals = jnp.linspace(0.5, 2.0, 40)[None] if path == "recurrence" else None

    flat, unflatten = flatten_util.ravel_pytree((params, u))

    @jax.jit
    def loss(flat_arguments):
      variables, inputs = unflatten(flat_arguments)
      return jnp.sum(weights * layer.apply(variables, inputs, reset=reset, intervals=intervals))

    analytic = np.asarray(jax.grad(loss)(flat))
    eps = 1e-6
    numeric = np.array([(loss(flat.at[i].add(eps)) - loss(flat.at[i].add(-eps))) / (2 * eps)
                        for i in range(flat.size)])  # central differences, every coordinate
    assert np.all(np.isfinite(analytic))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- parameters

def test_optimizer_puts_lambda_and_step_in_the_ssm_group():
  _, variables = layer_and_params(True)
  groups = optim.param_groups(variables["params"])
  assert groups == {"Lambda_re": "ssm", "Lambda_im": "ssm", "log_step": "ssm", "C": "decay",
                    "D": "no_decay"}


@pytest.mark.parametrize("kwargs, named", [
    (dict(state_size=7), "state_size"),
    (dict(dt_min=0.0), "dt_min"),
    (dict(dt_min=-1e-3), "dt_min"),
    (dict(lambda_init="hippo"), "init"),
])
def test_bad_arguments_are_value_errors_naming_them(kwargs, named):
  arguments = dict(state_size=N, init="legs", dt_min=1e-3, dt_max=1e-1)
  arguments.update({"init" if k == "lambda_init" else k: v for k, v in kwargs.items()})
  with pytest.raises(ValueError, match=named):
    ssm.validate_s4d_args(**arguments)
  with pytest.raises(ValueError, match=named):
    S4D(d_model=H, **kwargs).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, H)))


def test_bad_kernel_shapes():
  with pytest.raises(ValueError, match="length"):
    ssm.s4d_kernel(jnp.ones((H, 2), jnp.complex64), jnp.ones((H, 2), jnp.complex64),
                   jnp.zeros(H), 0)
  with pytest.raises(ValueError, match="K"):
    ssm.causal_conv(jnp.ones((5, H)), jnp.ones((H, 4)))
