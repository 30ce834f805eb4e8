"""Float64 NumPy oracle for S4D, written from the equations in docs/design.md, "S4D".

The recurrence as an explicit Python loop over time (vectorised over batch, channels and states),
nothing imported from s5scale. Conventions as tests/ssm_oracle.py: the backward direction is
z_k = Λ̄_k z_{k+1} + f_k u_k with step k's own discretisation, and a reset at k zeroes the forward
state carried into k and the backward state carried from k+1 into k when reset[k+1].
"""

import numpy as np

from tests import ssm_oracle


def lambda_init(state_size, init):
  """(N/2,) complex128: S4D-Lin −1/2 + iπn, or S4D-LegS the first half (eigh order) of HiPPO-N's
  spectrum."""
  if init == "lin":
    return np.array([complex(-0.5, np.pi * n) for n in range(state_size // 2)])
  return ssm_oracle.hippo_spectrum(state_size)[0][:state_size // 2]


def s4d_loop(lambda_, c, log_step, u, *, bidirectional, d=None, step_rescale=1.0, reset=None,
             intervals=None):
  """y (B, L, H) float64.

  lambda_: (H, n) complex; c: (H, n), or (2, H, n) when bidirectional; log_step: (H,);
  u: (B, L, H); reset: (B, L) bool; intervals: (B, L) positive.
  """
  lambda_ = np.asarray(lambda_, np.complex128)
  c = np.asarray(c, np.complex128)
  u = np.asarray(u, np.float64)
  batch, length, _ = u.shape
  delta = step_rescale * np.exp(np.asarray(log_step, np.float64))
  steps = np.ones((batch, length)) if intervals is None else np.asarray(intervals, np.float64)

  def discretized(k):
    delta_k = delta[None, :, None] * steps[:, k, None, None]          # (B, H, 1)
    lambda_bar = np.exp(delta_k * lambda_)
    return lambda_bar, (lambda_bar - 1) / lambda_

  readouts = c if bidirectional else c[None]
  y = np.zeros(u.shape)
  x = np.zeros((batch,) + lambda_.shape, np.complex128)
  for k in range(length):
    if reset is not None:
      x[reset[:, k]] = 0
    lambda_bar, factor = discretized(k)
    x = lambda_bar * x + factor * u[:, k, :, None]
    y[:, k] += 2 * np.sum(readouts[0] * x, axis=-1).real
  if bidirectional:
    z = np.zeros_like(x)
    for k in reversed(range(length)):
      if reset is not None and k + 1 < length:
        z[reset[:, k + 1]] = 0
      lambda_bar, factor = discretized(k)
      z = lambda_bar * z + factor * u[:, k, :, None]
      y[:, k] += 2 * np.sum(readouts[1] * z, axis=-1).real
  return y if d is None else y + np.asarray(d, np.float64) * u


def kernel_closed_form(lambda_, c, log_step, length, step_rescale=1.0):
  """K (H, L) float64: 2·Re Σ_n C (exp(ΔΛ) − 1)/Λ exp(ΔΛ l), term by term."""
  lambda_ = np.asarray(lambda_, np.complex128)
  c = np.asarray(c, np.complex128)
  delta = step_rescale * np.exp(np.asarray(log_step, np.float64))[:, None]
  kernel = np.zeros((lambda_.shape[0], length))
  for l in range(length):
    kernel[:, l] = 2 * np.sum(c * (np.exp(delta * lambda_) - 1) / lambda_
                              * np.exp(delta * lambda_ * l), axis=-1).real
  return kernel
