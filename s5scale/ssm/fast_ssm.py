"""The S5 SSM in planar real arithmetic: B̄ and C̃ as one real GEMM each around the fast scan.

Same numbers as the complex formulation in scan.py. With planar states x = [Re x; Im x] (2, P'):
  B̄u     = u @ [Re B̄ᵀ; Im B̄ᵀ]     (N, H) @ (H, 2, P') -> (N, 2, P')
  Re(C̃x) = x @ [Re C̃ᵀ; −Im C̃ᵀ]   (N, 2, P') @ (2, P', H) -> (N, H)
with N = batch × L, so no complex tensor of length L is ever built.
"""

import jax
import jax.numpy as jnp

from s5scale.ssm import fast_scan
from s5scale.ssm import recurrence


def input_matrix(b_bar):
  """(P', H) complex B̄ -> (H, 2, P') real: u @ it is planar B̄u."""
  return jnp.stack([b_bar.real.T, b_bar.imag.T], axis=1)


def output_matrix(c_tilde, conj_sym: bool):
  """(H, P') complex C̃ -> (2, P', H) real: planar x @ it is Re(C̃x), doubled with conj_sym."""
  matrix = jnp.stack([c_tilde.real.T, -c_tilde.imag.T], axis=0)
  return 2 * matrix if conj_sym else matrix


# The projections define their own VJP only to choose the operand order of each gradient GEMM:
# XLA's CPU dot reads "nh,ncp->hcp" (the weight gradient, contracting the long axis N) in place,
# while the order that autodiff derives makes it transpose the whole (N, 2, P') operand first.

@jax.custom_vjp
def _rows_to_planar(rows, matrix):
  """(N, H) @ (H, 2, P') -> (N, 2, P')."""
  return jnp.einsum("nh,hcp->ncp", rows, matrix)


def _rows_to_planar_forward(rows, matrix):
  return _rows_to_planar(rows, matrix), (rows, matrix)


def _rows_to_planar_backward(residuals, cotangent):
  rows, matrix = residuals
  return (jnp.einsum("ncp,hcp->nh", cotangent, matrix).astype(rows.dtype),
          jnp.einsum("nh,ncp->hcp", rows, cotangent).astype(matrix.dtype))


_rows_to_planar.defvjp(_rows_to_planar_forward, _rows_to_planar_backward)


@jax.custom_vjp
def _planar_to_rows(states, matrix):
  """(N, 2, P') @ (2, P', H) -> (N, H)."""
  return jnp.einsum("ncp,cph->nh", states, matrix)


def _planar_to_rows_forward(states, matrix):
  return _planar_to_rows(states, matrix), (states, matrix)


def _planar_to_rows_backward(residuals, cotangent):
  states, matrix = residuals
  matrix_cotangent = jnp.einsum("nh,ncp->hcp", cotangent, states).transpose(1, 2, 0)
  return (jnp.einsum("nh,cph->ncp", cotangent, matrix).astype(states.dtype),
          matrix_cotangent.astype(matrix.dtype))


_planar_to_rows.defvjp(_planar_to_rows_forward, _planar_to_rows_backward)


def project_input_planar(b_bar, u):
  """(P', H) complex B̄, (..., L, H) real u -> planar B̄u (..., L, 2, P'), as one GEMM."""
  rows = u.reshape(-1, u.shape[-1])
  matrix = input_matrix(b_bar)
  dtype = jnp.result_type(rows, matrix)
  return _rows_to_planar(rows.astype(dtype), matrix.astype(dtype)).reshape(
      u.shape[:-1] + matrix.shape[1:])


def project_output_planar(c_tilde, states, conj_sym: bool):
  """(H, P') complex C̃, planar (..., L, 2, P') x -> Re(C̃x) (..., L, H), as one GEMM."""
  rows = states.reshape((-1,) + states.shape[-2:])
  matrix = output_matrix(c_tilde, conj_sym)
  dtype = jnp.result_type(rows, matrix)
  return _planar_to_rows(rows.astype(dtype), matrix.astype(dtype)).reshape(
      states.shape[:-2] + matrix.shape[-1:])


def keep_masks(reset, bidirectional: bool):
  """Per-direction masks, 0 where the carried state is dropped.

  Forward, reset[k] drops the state carried into k. Backward, the document ends where the next step
  resets, so reset[k+1] drops the state carried from k+1 into k.

  Args:
    reset: (..., L) bool or None.
  Returns:
    [forward keep] or [forward keep, backward keep], each (..., L) float32 or None.
  """
  if reset is None:
    return [None, None] if bidirectional else [None]
  forward = 1 - reset.astype(jnp.float32)
  if not bidirectional:
    return [forward]
  backward = jnp.concatenate([forward[..., 1:], jnp.ones_like(forward[..., :1])], axis=-1)
  return [forward, backward]


def apply_ssm_planar(lambda_bar, b_bar, c_tilde, u, *, conj_sym: bool, bidirectional: bool, D=None,
                     reset=None, input_scale=None, impl: str = "auto", sharding=None):
  """One S5 SSM over a whole sequence, as scan.apply_ssm, computed with real GEMMs.

  Args:
    lambda_bar: (P',) complex, or (..., L, P') with per-step intervals.
    b_bar: (P', H) complex, or (..., L, P', H).
    c_tilde: (H, P') complex, or (H, 2P') when bidirectional.
    u: (..., L, H) real.
    D: (H,) real feedthrough, or None.
    reset: (..., L) bool; True at step k zeroes the state carried into step k.
    input_scale: (..., L, P') complex or None. If given, step k uses B̄_k = input_scale_k ⊙ b_bar:
      a time-varying B̄ without an (L, P', H) tensor.
    impl, sharding: how the recurrence runs (recurrence.linear_recurrence_planar).
  Returns:
    y: (..., L, H), u's dtype.
  """
  if b_bar.ndim == 2:
    bu = project_input_planar(b_bar, u)
  else:
    bu = fast_scan.to_planar(jnp.einsum("...lph,...lh->...lp", b_bar, u))
  if input_scale is not None:
    bu = fast_scan.complex_multiply(fast_scan.to_planar(input_scale), bu)
  multipliers = fast_scan.to_planar(lambda_bar)
  num_states = bu.shape[-1]
  directions = [False, True] if bidirectional else [False]
  y = None
  for direction, (reverse, keep) in enumerate(zip(directions, keep_masks(reset, bidirectional))):
    states = recurrence.linear_recurrence_planar(multipliers, bu, keep, reverse, impl=impl,
                                                 sharding=sharding)
    readout = c_tilde[:, direction * num_states:(direction + 1) * num_states]
    direction_y = project_output_planar(readout, states, conj_sym)
    y = direction_y if y is None else y + direction_y
  return y if D is None else y + D * u
