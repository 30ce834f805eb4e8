"""S4D's building blocks shared by its three forms (s4d.py): the per-channel step, the one call
into the linear recurrence, sums of powers of Λ̄ without the (H, N/2, L) matrix of powers, and the
FFT convolutions.

Per channel h, with Δ_h = step_rescale · exp(log Δ_h) and Λ̄ = exp(Δ_h Λ_h) (ZOH):
  x_k = Λ̄ x_{k−1} + (Λ̄ − 1)/Λ · u_k,   y_k = 2·Re(C_h x_k) + D_h u_k.

Shapes: Lambda (H, N/2) complex; log_step (H,) real; u (..., L, H) real.
"""

import math

import jax
import jax.numpy as jnp

from s5scale.ssm import recurrence
from s5scale.ssm.discretize import zoh_factors

# The power sums' GEMMs must not drop to bfloat16 passes on TPU: they feed every output of the
# layer.
HIGHEST = jax.lax.Precision.HIGHEST


def run_recurrence(multipliers, inputs, keep, reverse: bool, sharding=None, initial_state=None):
  """The one call through which S4D runs the linear recurrence x_k = a_k keep_k x_{k∓1} + b_k.

  Planar shapes as recurrence.linear_recurrence_planar: multipliers (2, P) or (..., L, 2, P),
  inputs (..., L, 2, P), keep (..., L) or None, initial_state (..., 2, P) or None. Returns
  (..., L, 2, P) states. sharding: the states' PartitionSpec; when it splits time over the mesh,
  the recurrence runs context-parallel.

  Always the chunked scan: the Pallas kernel is sharded by S5's ("batch", "length", "state")
  layout, and S4D's flattened H·N/2 states would need their own partition spec first.
  """
  return recurrence.linear_recurrence_planar(multipliers, inputs, keep, reverse, impl="chunked",
                                             sharding=sharding, initial_state=initial_state)


def channel_steps(log_step, step_rescale=1.0, intervals=None):
  """Δ per channel: (H,), or intervals.shape + (H,) when per-step intervals multiply it."""
  delta = step_rescale * jnp.exp(log_step)
  return delta if intervals is None else delta * intervals[..., None]


def discretized(Lambda, log_step, step_rescale=1.0):
  """Λ̄, the input factor (Λ̄ − 1)/Λ and log Λ̄ = ΔΛ, each (H, N/2) complex."""
  delta = channel_steps(log_step, step_rescale)[:, None]
  lambda_bar, input_factor = zoh_factors(Lambda, delta)
  return lambda_bar, input_factor, Lambda * delta


def _power_split(length: int):
  """l = aT + t with T ≈ sqrt(L): (T, A) with T·A ≥ L."""
  inner_length = math.isqrt(max(length, 1) - 1) + 1             # T, with T² ≥ L
  return inner_length, -(-length // inner_length)


def weighted_powers(weights, exponent, length: int):
  """2·Re Σ_n w_n Λ̄_n^l for l = 0..L−1, with Λ̄ = exp(exponent).

  Λ̄^l is evaluated as exp(exponent·aT) · exp(exponent·t) for l = aT + t with T ≈ sqrt(L): the
  Vandermonde product then is one real GEMM of (H, L/T, N) by (H, N, T), and the (H, N/2, L)
  matrix of powers is never built (2 GB at H = 128, N = 64, L = 65,536).

  Args:
    weights: (..., H, N/2) complex.
    exponent: (H, N/2) complex.
    length: L >= 1.
  Returns:
    (..., H, L) real.
  """
  inner_length, outer_length = _power_split(length)
  real_dtype = jnp.real(weights).dtype
  outer_steps = jnp.arange(outer_length, dtype=real_dtype) * inner_length
  inner_steps = jnp.arange(inner_length, dtype=real_dtype)
  outer = weights[..., None, :] * jnp.exp(exponent[:, None, :] * outer_steps[:, None])
  inner = jnp.exp(exponent[..., None] * inner_steps)             # (H, N/2, T)
  # 2·Re(a·b) = 2(Re a Re b − Im a Im b): one real GEMM contracting 2·(N/2) terms.
  outer_planar = jnp.concatenate([outer.real, -outer.imag], axis=-1)   # (..., H, A, N)
  inner_planar = jnp.concatenate([inner.real, inner.imag], axis=-2)    # (H, N, T)
  powers = 2 * jnp.einsum("...han,hnt->...hat", outer_planar, inner_planar, precision=HIGHEST)
  powers = powers.reshape(powers.shape[:-2] + (outer_length * inner_length,))
  return powers[..., :length]


def power_sum(exponent, values):
  """Σ_l Λ̄_n^l · values_l per channel, with Λ̄ = exp(exponent): the transpose of weighted_powers,
  by the same split l = aT + t (a GEMM over t, then a short sum over a), so neither the
  (H, N/2, L) powers nor (..., L, H, N/2) products are built.

  Args:
    exponent: (H, N/2) complex.
    values: (..., L, H) real.
  Returns:
    (..., H, N/2) complex.
  """
  length = values.shape[-2]
  inner_length, outer_length = _power_split(length)
  values = jnp.pad(values, [(0, 0)] * (values.ndim - 2)
                   + [(0, outer_length * inner_length - length), (0, 0)])
  values = values.reshape(values.shape[:-2] + (outer_length, inner_length, values.shape[-1]))
  real_dtype = values.dtype
  inner = jnp.exp(exponent[..., None] * jnp.arange(inner_length, dtype=real_dtype))  # (H, N/2, T)
  inner_planar = jnp.stack([inner.real, inner.imag], axis=1)                          # (H, 2, N/2, T)
  partial = jnp.einsum("...ath,hcnt->...ahcn", values, inner_planar, precision=HIGHEST)
  partial = jax.lax.complex(partial[..., 0, :], partial[..., 1, :])                   # (..., A, H, N/2)
  outer = jnp.exp(exponent[..., None]
                  * (jnp.arange(outer_length, dtype=real_dtype) * inner_length))      # (H, N/2, A)
  return jnp.einsum("...ahn,hna->...hn", partial, outer, precision=HIGHEST)


def s4d_kernel(Lambda, C, log_step, length: int, *, step_rescale=1.0):
  """The ZOH convolution kernel K_h[l] = 2·Re Σ_n C_hn (Λ̄_hn − 1)/Λ_hn · Λ̄_hn^l, l = 0..L−1.

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
  _, input_factor, exponent = discretized(Lambda, log_step, step_rescale)
  return weighted_powers(C * input_factor, exponent, length)


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
