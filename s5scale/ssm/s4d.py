"""S4D (Gu, Gupta, Goel, Ré 2022; docs/design.md, S4D): H independent single-input single-output
diagonal SSMs, N/2 complex states per channel (conjugate pairs kept once), B folded into C.

Per channel h, with Δ_h = step_rescale · exp(log Δ_h) and Λ̄ = exp(Δ_h Λ_h) (ZOH):
  x_k = Λ̄ x_{k−1} + (Λ̄ − 1)/Λ · u_k,   y_k = 2·Re(C_h x_k) + D_h u_k,
which is the causal convolution y = K * u + D u with
  K_h[l] = 2·Re Σ_n C_hn (Λ̄_hn − 1)/Λ_hn · Λ̄_hn^l.

Three ways to compute the same numbers:
- convolution (`s4d_kernel` + `causal_conv`): FFTs of length 2L, O(L log L), no state is built;
- chunked (`s4d_chunked`): resets (packed documents) cut the convolution, which no single kernel
  can express; a masked Toeplitz product inside chunks of T steps, and the recurrence carries the
  state across chunk ends only;
- recurrence (`s4d_recurrence`): the project's linear recurrence over H·N/2 states, for per-step
  intervals (Λ̄ varies along time) and prompt prefill; `s4d_step` is its one-step form.

Shapes: Lambda, C (H, N/2) complex (C (2, H, N/2) when bidirectional: forward, backward);
log_step (H,) real; u (..., L, H) real, y (..., L, H) real.
"""

import math

import jax
import jax.numpy as jnp

from s5scale.ssm import recurrence
from s5scale.ssm.discretize import zoh_factors
from s5scale.ssm.planar_complex import to_planar

# The kernel's GEMM must not drop to bfloat16 passes on TPU: K feeds every output of the layer.
_HIGHEST = jax.lax.Precision.HIGHEST


def run_recurrence(multipliers, inputs, keep, reverse: bool, sharding=None):
  """The one call through which S4D runs the linear recurrence x_k = a_k keep_k x_{k∓1} + b_k.

  Planar shapes as recurrence.linear_recurrence_planar: multipliers (2, P) or (..., L, 2, P),
  inputs (..., L, 2, P), keep (..., L) or None. Returns (..., L, 2, P) states. sharding: the
  states' PartitionSpec; when it splits time over the mesh, the recurrence runs context-parallel.

  Always the chunked scan: the Pallas kernel is sharded by S5's ("batch", "length", "state")
  layout, and S4D's flattened H·N/2 states would need their own partition spec first.
  """
  return recurrence.linear_recurrence_planar(multipliers, inputs, keep, reverse, impl="chunked",
                                             sharding=sharding)


def channel_steps(log_step, step_rescale=1.0, intervals=None):
  """Δ per channel: (H,), or intervals.shape + (H,) when per-step intervals multiply it."""
  delta = step_rescale * jnp.exp(log_step)
  return delta if intervals is None else delta * intervals[..., None]


# ----------------------------------------------------------------------------- convolution

def s4d_kernel(Lambda, C, log_step, length: int, *, step_rescale=1.0):
  """The ZOH convolution kernel K_h[l], l = 0..L−1.

  Λ̄^l is evaluated as exp(ΔΛ·(aT)) · exp(ΔΛ·t) for l = aT + t with T ≈ sqrt(L): the Vandermonde
  product then is one real GEMM of (H, L/T, N) by (H, N, T), and the (H, N/2, L) matrix of powers
  is never built (2 GB at H = 128, N = 64, L = 65,536).

  Args:
    Lambda: (H, N/2) complex.
    C: (..., H, N/2) complex (e.g. (2, H, N/2) for both directions).
    log_step: (H,) real.
    length: L >= 1.
  Returns:
    K: (..., H, L) real, log_step's dtype.
  """
  if length < 1:
    raise ValueError(f"length must be >= 1, got {length}")
  delta = channel_steps(log_step, step_rescale)[:, None]
  _, input_factor = zoh_factors(Lambda, delta)
  weights = C * input_factor                                     # (..., H, N/2)
  exponent = Lambda * delta                                      # (H, N/2): log Λ̄
  inner_length = math.isqrt(length - 1) + 1                      # T, with T² ≥ L
  outer_length = -(-length // inner_length)                      # ceil(L / T)
  real_dtype = jnp.real(weights).dtype
  outer_steps = jnp.arange(outer_length, dtype=real_dtype) * inner_length
  inner_steps = jnp.arange(inner_length, dtype=real_dtype)
  outer = weights[..., None, :] * jnp.exp(exponent[:, None, :] * outer_steps[:, None])
  inner = jnp.exp(exponent[..., None] * inner_steps)             # (H, N/2, T)
  # 2·Re(a·b) = 2(Re a Re b − Im a Im b): one real GEMM contracting 2·(N/2) terms.
  outer_planar = jnp.concatenate([outer.real, -outer.imag], axis=-1)   # (..., H, A, N)
  inner_planar = jnp.concatenate([inner.real, inner.imag], axis=-2)    # (H, N, T)
  kernel = 2 * jnp.einsum("...han,hnt->...hat", outer_planar, inner_planar, precision=_HIGHEST)
  kernel = kernel.reshape(kernel.shape[:-2] + (outer_length * inner_length,))
  return kernel[..., :length]


def _fft_conv(u, two_sided_kernel):
  """y[k] = Σ_j kernel[(k − j) mod 2L] u[j] by FFTs of length 2L: no wrap-around for |k − j| < L.

  u: (..., L, H); two_sided_kernel: (H, 2L). Returns (..., L, H), u's dtype.
  """
  length = u.shape[-2]
  u_spectrum = jnp.fft.rfft(u, n=2 * length, axis=-2)                 # (..., L+1, H)
  kernel_spectrum = jnp.fft.rfft(two_sided_kernel, axis=-1).T          # (L+1, H)
  y = jnp.fft.irfft(u_spectrum * kernel_spectrum, n=2 * length, axis=-2)
  return y[..., :length, :].astype(u.dtype)


def _check_kernel(u, K, name):
  if K.shape != (u.shape[-1], u.shape[-2]):
    raise ValueError(f"{name} must be (H, L) = {(u.shape[-1], u.shape[-2])} for u {u.shape}, got "
                     f"{K.shape}")


def causal_conv(u, K, D=None):
  """y_k = Σ_{j ≤ k} K[k − j] u_j (+ D u_k), per channel, by FFTs of length 2L.

  Args:
    u: (..., L, H) real.
    K: (H, L) real.
    D: (H,) real or None.
  Returns:
    y: (..., L, H) real.
  """
  _check_kernel(u, K, "K")
  padding = jnp.zeros(K.shape, K.dtype)
  y = _fft_conv(u, jnp.concatenate([K, padding], axis=-1))
  return y if D is None else y + D * u


def bidirectional_conv(u, K_forward, K_backward, D=None):
  """causal_conv(u, K_forward) plus K_backward applied to the time-reversed input:
  y_k = Σ_{j ≤ k} K_forward[k − j] u_j + Σ_{j ≥ k} K_backward[j − k] u_j (+ D u_k).

  One FFT pair: the two kernels form one two-sided kernel of length 2L (K_backward[m] at lag −m).
  Lag 0 gets both kernels' first taps, as S5's reverse scan reads u_k into the backward state at k.

  Args:
    u: (..., L, H) real; K_forward, K_backward: (H, L) real; D: (H,) real or None.
  Returns:
    y: (..., L, H) real.
  """
  _check_kernel(u, K_forward, "K_forward")
  _check_kernel(u, K_backward, "K_backward")
  lag_zero = K_forward[:, :1] + K_backward[:, :1]
  gap = jnp.zeros_like(lag_zero)                      # lag ±L never occurs
  two_sided = jnp.concatenate(
      [lag_zero, K_forward[:, 1:], gap, jnp.flip(K_backward[:, 1:], axis=-1)], axis=-1)
  y = _fft_conv(u, two_sided)
  return y if D is None else y + D * u


def s4d_conv(Lambda, C, log_step, u, *, bidirectional: bool, D=None, step_rescale=1.0):
  """The S4D layer's SSM over a whole sequence by convolution.

  Args:
    Lambda: (H, N/2) complex; C: (H, N/2) complex, or (2, H, N/2) when bidirectional.
    log_step: (H,) real; u: (..., L, H) real; D: (H,) real or None.
  Returns:
    y: (..., L, H) real.
  """
  kernel = s4d_kernel(Lambda, C, log_step, u.shape[-2], step_rescale=step_rescale)
  if bidirectional:
    return bidirectional_conv(u, kernel[0], kernel[1], D)
  return causal_conv(u, kernel, D)


# ----------------------------------------------------------------------------- chunked, with resets

def _chunk_masks(reset, chunk: int):
  """Which inputs reach which outputs inside chunks of `chunk` steps, from forward resets.

  With r the resets counted from the chunk's start (inclusive), u_s reaches x_t (s ≤ t) exactly
  when no reset lies in (s, t], i.e. r_s = r_t.

  Args:
    reset: (..., L) bool, L a multiple of chunk.
  Returns:
    within (..., L/T, T, T): u_s reaches y_t inside the chunk;
    carried (..., L/T, T): the state entering the chunk reaches y_t;
    to_end (..., L/T, T): u_s reaches the chunk's last state.
  """
  resets = jnp.cumsum(reset.reshape(reset.shape[:-1] + (-1, chunk)).astype(jnp.int32), axis=-1)
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  within = (resets[..., :, None] == resets[..., None, :]) & causal
  return within, resets == 0, resets == resets[..., -1:]


def _toeplitz(kernel):
  """(H, T) kernel -> (H, T, T) lower-triangular Toeplitz matrices, [h, t, s] = K[h, t − s]."""
  chunk = kernel.shape[-1]
  lags = jnp.arange(chunk)[:, None] - jnp.arange(chunk)[None, :]
  return jnp.where(lags >= 0, kernel[:, jnp.maximum(lags, 0)], 0)


def _planar_powers(factor, exponent, powers):
  """factor·Λ̄^k for each k in powers as planar (K, 2, H, N/2): factor, exponent (H, N/2) complex."""
  values = factor * jnp.exp(exponent * powers[:, None, None])
  return jnp.stack([values.real, values.imag], axis=1)


def _forward_chunked(Lambda, C, log_step, u, reset, chunk: int, step_rescale, sharding):
  """One forward direction with resets, no D: u (..., L, H), reset (..., L), L = multiple of T.

  Three parts per chunk of T steps: the chunk's own inputs through the masked (T, T) Toeplitz
  kernel; the state entering the chunk, read out through C Λ̄^{t+1}; and the chunk's last state,
  carried from chunk to chunk by the project's recurrence over L/T steps. States exist only at
  chunk ends, (..., L/T, H, N/2), T times fewer than s4d_states builds.
  """
  *batch, length, channels = u.shape
  within, carried, to_end = _chunk_masks(reset, chunk)
  chunks = u.reshape(*batch, length // chunk, chunk, channels)             # (..., A, T, H)
  dtype = u.dtype
  toeplitz = _toeplitz(s4d_kernel(Lambda, C, log_step, chunk, step_rescale=step_rescale))
  y = jnp.einsum("...ats,hts,...ash->...ath", within.astype(dtype), toeplitz.astype(dtype),
                 chunks, precision=_HIGHEST)
  delta = channel_steps(log_step, step_rescale)[:, None]
  lambda_bar, input_factor = zoh_factors(Lambda, delta)
  exponent = Lambda * delta
  steps = jnp.arange(chunk, dtype=jnp.real(exponent).dtype)
  # The chunk's inputs into its last state: Σ_s (Λ̄−1)/Λ · Λ̄^{T−1−s} u_s over s reaching the end.
  into_end = _planar_powers(input_factor, exponent, chunk - 1 - steps).astype(dtype)
  local = jnp.einsum("...ash,sphn->...aphn", chunks * to_end[..., None].astype(dtype), into_end,
                     precision=_HIGHEST)                                     # (..., A, 2, H, N/2)
  local = local.reshape(local.shape[:-2] + (-1,))
  chunk_decay = to_planar((lambda_bar ** chunk).reshape(-1)).astype(dtype)
  ends = run_recurrence(chunk_decay, local, carried[..., -1].astype(dtype), reverse=False,
                        sharding=sharding)
  entering = jnp.concatenate([jnp.zeros_like(ends[..., :1, :, :]), ends[..., :-1, :, :]], axis=-3)
  entering = entering.reshape(entering.shape[:-1] + Lambda.shape)            # (..., A, 2, H, N/2)
  # 2·Re(C Λ̄^{t+1} x) = 2(Re(CΛ̄^{t+1}) Re x − Im(CΛ̄^{t+1}) Im x).
  readout_powers = _planar_powers(C, exponent, steps + 1) * jnp.asarray([1, -1])[:, None, None]
  y = y + 2 * carried[..., None].astype(dtype) * jnp.einsum(
      "...aphn,tphn->...ath", entering, readout_powers.astype(dtype), precision=_HIGHEST)
  return y.reshape(u.shape)


def s4d_chunked(Lambda, C, log_step, u, *, bidirectional: bool, reset, D=None, step_rescale=1.0,
                chunk_size: int = 16, sharding=None):
  """The same SSM as s4d_recurrence with resets (packed documents), without a state per step.

  Per chunk of T steps a masked (T, T) Toeplitz product, plus the chunk-end states carried by the
  recurrence: O(L·T·H + L·H·N) work and (L/T)·H·N/2 states, where s4d_recurrence keeps L·H·N/2
  (text_small with N = 256: 16× less memory). The backward direction runs forward in reversed
  time. Per-step intervals vary Λ̄ along time and need s4d_recurrence.

  T = 16 balances the two costs: fwd+bwd of one text_small layer (batch 4, L 512, H 256, N 256)
  took 0.62, 0.37, 0.42, 0.84 and 1.61 s at T = 8, 16, 32, 64 and 128 on 2 shared CPU cores, and
  3.7 s through s4d_recurrence.

  Time split over the mesh (context parallelism): everything but the chunk-end recurrence is
  local to a chunk, so with `sharding` naming the split (PartitionSpec of the chunk-end states
  (..., L/T, 2, H·N/2)) that recurrence runs context-parallel (one all-gather of segment end
  states) and each device keeps its own segment of time, as long as a segment holds whole chunks.

  Args:
    as s4d_conv, plus reset (..., L) bool (True where a new document starts), chunk_size T and
    sharding (a PartitionSpec or None).
  Returns:
    y: (..., L, H) real.
  """
  length = u.shape[-2]
  chunk = min(chunk_size, length)
  padding = -length % chunk

  def forward(c_direction, inputs, resets):
    # Zeros after the end never reach an earlier output of a forward direction.
    inputs = jnp.pad(inputs, [(0, 0)] * (inputs.ndim - 2) + [(0, padding), (0, 0)])
    resets = jnp.pad(resets, [(0, 0)] * (resets.ndim - 1) + [(0, padding)])
    y = _forward_chunked(Lambda, c_direction, log_step, inputs, resets, chunk, step_rescale,
                         sharding)
    return y[..., :length, :]

  if not bidirectional:
    y = forward(C, u, reset)
  else:
    # Reversed time: the state carried from k+1 into k is dropped where reset[k+1].
    reversed_reset = jnp.concatenate([jnp.zeros_like(reset[..., :1]),
                                      jnp.flip(reset, axis=-1)[..., :-1]], axis=-1)
    y = forward(C[0], u, reset) + jnp.flip(forward(C[1], jnp.flip(u, axis=-2), reversed_reset),
                                           axis=-2)
  return y if D is None else y + D * u


# ----------------------------------------------------------------------------- recurrence

def _planar_inputs(input_factor, u):
  """(Λ̄ − 1)/Λ · u as planar (..., L, 2, H·N/2), without a complex (..., L, H, N/2) tensor.

  input_factor: (H, N/2) or (..., L, H, N/2) complex; u: (..., L, H) real.
  """
  factor = jnp.stack([input_factor.real, input_factor.imag], axis=-3)   # (..., 2, H, N/2)
  inputs = factor * u[..., None, :, None]
  return inputs.reshape(inputs.shape[:-2] + (-1,))


def s4d_states(Lambda, log_step, u, *, reset=None, intervals=None, step_rescale=1.0,
               reverse: bool = False):
  """Every state x_k of one direction's recurrence.

  Args:
    Lambda: (H, N/2) complex; log_step: (H,) real; u: (..., L, H) real.
    reset: (..., L) bool or None; forward, True at k drops the state carried into k; reverse, the
      state carried from k+1 into k is dropped where reset[k+1] (the next document starts there).
    intervals: (..., L) positive real or None; step k uses Δ·intervals[k].
  Returns:
    (..., L, 2, H, N/2) planar states [Re x; Im x], u's dtype.
  """
  delta = channel_steps(log_step, step_rescale, intervals)[..., None]   # (H, 1) or (..., L, H, 1)
  lambda_bar, input_factor = zoh_factors(Lambda, delta)
  inputs = _planar_inputs(input_factor, u).astype(u.dtype)
  multipliers = to_planar(lambda_bar.reshape(lambda_bar.shape[:-2] + (-1,)))
  keep = recurrence.keep_masks(reset, bidirectional=True)[int(reverse)]
  states = run_recurrence(multipliers, inputs, keep, reverse)
  return states.reshape(states.shape[:-1] + Lambda.shape)


def readout(C, planar_states):
  """2·Re(C x) per channel: C (H, N/2) complex, states (..., L, 2, H, N/2) -> (..., L, H)."""
  c_planar = jnp.stack([C.real, -C.imag]).astype(planar_states.dtype)  # (2, H, N/2)
  return 2 * jnp.einsum("...chn,chn->...h", planar_states, c_planar)


def s4d_recurrence(Lambda, C, log_step, u, *, bidirectional: bool, D=None, reset=None,
                   intervals=None, step_rescale=1.0):
  """The same SSM as s4d_conv, by the linear recurrence; also with resets and per-step intervals.

  Args:
    as s4d_conv, plus reset (..., L) bool and intervals (..., L) positive real, each or None.
  Returns:
    y: (..., L, H) real.
  """
  directions = [False, True] if bidirectional else [False]
  readouts = C if bidirectional else C[None]
  y = 0
  for reverse, c_direction in zip(directions, readouts):
    states = s4d_states(Lambda, log_step, u, reset=reset, intervals=intervals,
                        step_rescale=step_rescale, reverse=reverse)
    y = y + readout(c_direction, states)
  return y if D is None else y + D * u


def s4d_step(Lambda, C, log_step, state, u_t, *, D=None, interval=None, step_rescale=1.0):
  """One recurrent step, O(1) in the context length.

  Args:
    Lambda, C: (H, N/2) complex; log_step: (H,) real.
    state: (..., H, N/2) complex, x_{k−1}.
    u_t: (..., H) real.
    interval: (...,) positive real or None.
  Returns:
    (state x_k (..., H, N/2) complex, y_k (..., H) real).
  """
  delta = channel_steps(log_step, step_rescale, interval)[..., None]
  lambda_bar, input_factor = zoh_factors(Lambda, delta)
  state = lambda_bar * state + input_factor * u_t[..., None]
  y = 2 * jnp.sum((C * state).real, axis=-1)
  return state, (y if D is None else y + D * u_t)
