"""S4D (Gu, Gupta, Goel, Ré 2022; docs/design.md, S4D): H independent single-input single-output
diagonal SSMs, N/2 complex states per channel (conjugate pairs kept once), B folded into C.

Per channel h, with Δ_h = step_rescale · exp(log Δ_h) and Λ̄ = exp(Δ_h Λ_h) (ZOH):
  x_k = Λ̄ x_{k−1} + (Λ̄ − 1)/Λ · u_k,   y_k = 2·Re(C_h x_k) + D_h u_k,
which is the causal convolution y = K * u + D u with
  K_h[l] = 2·Re Σ_n C_hn (Λ̄_hn − 1)/Λ_hn · Λ̄_hn^l.

Three ways to compute the same numbers:
- convolution (`s4d_kernel` + `causal_conv`, s4d_kernel.py; `s4d_conv`): FFTs of length 2L,
  O(L log L), no state is built;
- chunked (`s4d_chunked`, s4d_chunked.py): resets (packed documents) cut the convolution, which
  no single kernel can express; a masked Toeplitz product inside chunks of T steps, and the
  recurrence carries the state across chunk ends only. It is also the form for time split over
  the mesh;
- recurrence (`s4d_recurrence`): the project's linear recurrence over H·N/2 states, for per-step
  intervals (Λ̄ varies along time); `s4d_step` is its one-step form.
Each causal form also takes a carried initial state x_{−1} (a window continuing the previous one)
and then returns the state after its last step too.

Shapes: Lambda, C (H, N/2) complex (C (2, H, N/2) when bidirectional: forward, backward);
log_step (H,) real; u (..., L, H) real, y (..., L, H) real; states (..., H, N/2) complex.
"""

import jax.numpy as jnp

from s5scale.ssm import mesh_spec
from s5scale.ssm import recurrence
from s5scale.ssm.discretize import zoh_factors
from s5scale.ssm.planar_complex import from_planar, to_planar
from s5scale.ssm.s4d_chunked import s4d_chunked
from s5scale.ssm.s4d_kernel import (bidirectional_conv, causal_conv, channel_steps, discretized,
                                    power_sum, run_recurrence, s4d_kernel, weighted_powers)


def s4d_conv(Lambda, C, log_step, u, *, bidirectional: bool, D=None, step_rescale=1.0,
             sharding=None, initial_state=None):
  """The S4D layer's SSM over a whole sequence by convolution.

  With an initial state h (the state entering step 0), y_k gains 2·Re Σ_n C_n Λ̄_n^{k+1} h_n and
  the state after the last step is x_{L−1} = Λ̄^L h + (Λ̄−1)/Λ · Σ_j Λ̄^j u_{L−1−j}; both are sums
  of powers split as the kernel's (s4d_kernel.py), so no per-step state is built.

  Args:
    Lambda: (H, N/2) complex; C: (H, N/2) complex, or (2, H, N/2) when bidirectional.
    log_step: (H,) real; u: (..., L, H) real; D: (H,) real or None.
    sharding: PartitionSpec of the chunk-end states (..., L/T, 2, H·N/2) over the tracing
      context's mesh, or None. When it splits time over a mesh axis of more than one device, the
      chunked form runs instead (s4d_chunked): a whole-sequence FFT would gather time, while the
      chunked form keeps each device on its own segment and hands the state across segments.
    initial_state: (..., H, N/2) complex state entering step 0, or None (zero). Causal only.
  Returns:
    y: (..., L, H) real; with initial_state, (y, final_state (..., H, N/2) complex).
  """
  recurrence.check_carried(initial_state, bidirectional)
  if mesh_spec.time_axis(sharding) is not None:
    return s4d_chunked(Lambda, C, log_step, u, bidirectional=bidirectional, D=D,
                       step_rescale=step_rescale, sharding=sharding, initial_state=initial_state)
  length = u.shape[-2]
  kernel = s4d_kernel(Lambda, C, log_step, length, step_rescale=step_rescale)
  if bidirectional:
    return bidirectional_conv(u, kernel[0], kernel[1], D)
  y = causal_conv(u, kernel, D)
  if initial_state is None:
    return y
  lambda_bar, input_factor, exponent = discretized(Lambda, log_step, step_rescale)
  carried = weighted_powers(C * lambda_bar * initial_state, exponent, length)   # (..., H, L)
  y = y + jnp.swapaxes(carried, -1, -2).astype(y.dtype)
  final = (jnp.exp(exponent * length) * initial_state
           + input_factor * power_sum(exponent, jnp.flip(u, axis=-2)))
  return y, final.astype(jnp.result_type(u.dtype, jnp.complex64))


# ----------------------------------------------------------------------------- recurrence

def _planar_inputs(input_factor, u):
  """(Λ̄ − 1)/Λ · u as planar (..., L, 2, H·N/2), without a complex (..., L, H, N/2) tensor.

  input_factor: (H, N/2) or (..., L, H, N/2) complex; u: (..., L, H) real.
  """
  factor = jnp.stack([input_factor.real, input_factor.imag], axis=-3)   # (..., 2, H, N/2)
  inputs = factor * u[..., None, :, None]
  return inputs.reshape(inputs.shape[:-2] + (-1,))


def s4d_states(Lambda, log_step, u, *, reset=None, intervals=None, step_rescale=1.0,
               reverse: bool = False, initial_state=None):
  """Every state x_k of one direction's recurrence.

  Args:
    Lambda: (H, N/2) complex; log_step: (H,) real; u: (..., L, H) real.
    reset: (..., L) bool or None; forward, True at k drops the state carried into k; reverse, the
      state carried from k+1 into k is dropped where reset[k+1] (the next document starts there).
    intervals: (..., L) positive real or None; step k uses Δ·intervals[k].
    initial_state: (..., H, N/2) complex state entering step 0 (forward only), or None (zero).
  Returns:
    (..., L, 2, H, N/2) planar states [Re x; Im x], u's dtype.
  """
  delta = channel_steps(log_step, step_rescale, intervals)[..., None]   # (H, 1) or (..., L, H, 1)
  lambda_bar, input_factor = zoh_factors(Lambda, delta)
  inputs = _planar_inputs(input_factor, u).astype(u.dtype)
  multipliers = to_planar(lambda_bar.reshape(lambda_bar.shape[:-2] + (-1,)))
  keep = recurrence.keep_masks(reset, bidirectional=True)[int(reverse)]
  entering = None if initial_state is None else to_planar(
      initial_state.reshape(initial_state.shape[:-2] + (-1,)))
  states = run_recurrence(multipliers, inputs, keep, reverse, initial_state=entering)
  return states.reshape(states.shape[:-1] + Lambda.shape)


def readout(C, planar_states):
  """2·Re(C x) per channel: C (H, N/2) complex, states (..., L, 2, H, N/2) -> (..., L, H)."""
  c_planar = jnp.stack([C.real, -C.imag]).astype(planar_states.dtype)  # (2, H, N/2)
  return 2 * jnp.einsum("...chn,chn->...h", planar_states, c_planar)


def s4d_recurrence(Lambda, C, log_step, u, *, bidirectional: bool, D=None, reset=None,
                   intervals=None, step_rescale=1.0, initial_state=None):
  """The same SSM as s4d_conv, by the linear recurrence; also with resets and per-step intervals.

  Args:
    as s4d_conv, plus reset (..., L) bool and intervals (..., L) positive real, each or None.
  Returns:
    y: (..., L, H) real; with initial_state, (y, final_state (..., H, N/2) complex).
  """
  recurrence.check_carried(initial_state, bidirectional)
  directions = [False, True] if bidirectional else [False]
  readouts = C if bidirectional else C[None]
  y = 0
  for reverse, c_direction in zip(directions, readouts):
    states = s4d_states(Lambda, log_step, u, reset=reset, intervals=intervals,
                        step_rescale=step_rescale, reverse=reverse, initial_state=initial_state)
    y = y + readout(c_direction, states)
  y = y if D is None else y + D * u
  if initial_state is None:
    return y
  last = states[..., -1, :, :, :]                          # (..., 2, H, N/2)
  return y, from_planar(last.reshape(last.shape[:-2] + (-1,))).reshape(initial_state.shape)


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
