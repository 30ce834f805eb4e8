"""The S5 recurrence x_k = Λ̄_k ⊙ x_{k−1} + B̄_k u_k and its readout y_k = C̃ x_k + D u_k.

Shapes lead with any batch dims: u (..., L, H) real; states (..., L, P') complex.
"""

import jax
import jax.numpy as jnp

from s5scale.ssm import fast_scan
from s5scale.ssm import fast_ssm


def project_input(b_bar, u):
  """B̄u per step.

  Args:
    b_bar: (P', H) complex, or (..., L, P', H) when it varies along time.
    u: (..., L, H) real.
  Returns:
    (..., L, P') complex.
  """
  if b_bar.ndim == 2:
    return jnp.einsum("...lh,ph->...lp", u, b_bar)
  return jnp.einsum("...lph,...lh->...lp", b_bar, u)


def project_output(c_tilde, states, conj_sym: bool):
  """Re(C̃ x), doubled with conj_sym because each kept state stands for a conjugate pair.

  Args:
    c_tilde: (H, P'') complex.
    states: (..., L, P'') complex.
  Returns:
    (..., L, H) real.
  """
  y = jnp.einsum("hp,...lp->...lh", c_tilde, states).real
  return 2 * y if conj_sym else y


def carry_multipliers(lambda_bar, bu_shape, reset, reverse: bool):
  """Λ̄ broadcast to (..., L, P'), zeroed where a document boundary stops the carried state.

  Forward, reset[k] zeroes the state carried into step k. Backward, the document ends where the
  next step resets, so reset[k+1] zeroes the state carried from k+1 into k.
  """
  multipliers = jnp.broadcast_to(lambda_bar, bu_shape)
  if reset is None:
    return multipliers
  if reverse:
    reset = jnp.concatenate([reset[..., 1:], jnp.zeros_like(reset[..., :1])], axis=-1)
  return jnp.where(reset[..., None], jnp.zeros((), multipliers.dtype), multipliers)


def _combine(earlier, later):
  a_earlier, b_earlier = earlier
  a_later, b_later = later
  return a_later * a_earlier, a_later * b_earlier + b_later


def linear_recurrence_reference(multipliers, bu, reverse: bool = False):
  """The paper's formulation: jax.lax.associative_scan over complex (Λ̄, B̄u) pairs.

  Args:
    multipliers: (..., L, P') complex, Λ̄_k (zero at resets).
    bu: (..., L, P') complex.
  Returns:
    states (..., L, P') complex.
  """
  _, states = jax.lax.associative_scan(
      _combine, (multipliers, bu), reverse=reverse, axis=bu.ndim - 2)
  return states


IMPLS = ("default", "reference")


def check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"scan_impl must be one of {IMPLS}, got {impl!r}")


def scan_states(lambda_bar, bu, *, bidirectional: bool, reset=None, impl: str = "default"):
  """All states of the recurrence; bidirectional concatenates the reversed scan's states.

  Args:
    lambda_bar: (P',) or (..., L, P') complex.
    bu: (..., L, P') complex.
    reset: (..., L) bool or None.
    impl: "default" (fast) or "reference" (associative_scan, plain autodiff).
  Returns:
    (..., L, P') complex, or (..., L, 2P') when bidirectional.
  """
  check_impl(impl)
  directions = [False, True] if bidirectional else [False]
  if impl == "default":
    bu_planar, multipliers = fast_scan.to_planar(bu), fast_scan.to_planar(lambda_bar)
    keeps = fast_ssm.keep_masks(reset, bidirectional)
    states = [fast_scan.from_planar(
        fast_scan.linear_recurrence_planar(multipliers, bu_planar, keep, reverse))
              for reverse, keep in zip(directions, keeps)]
  else:
    states = [linear_recurrence_reference(carry_multipliers(lambda_bar, bu.shape, reset, reverse),
                                          bu, reverse)
              for reverse in directions]
  return jnp.concatenate(states, axis=-1) if bidirectional else states[0]


def apply_ssm(lambda_bar, b_bar, c_tilde, u, *, conj_sym: bool, bidirectional: bool, D=None,
              reset=None, impl: str = "default"):
  """One S5 SSM over a whole sequence (parallel mode).

  Args:
    lambda_bar: (P',) complex, or (..., L, P') with per-step intervals.
    b_bar: (P', H) complex, or (..., L, P', H).
    c_tilde: (H, P') complex, or (H, 2P') when bidirectional.
    u: (..., L, H) real.
    D: (H,) real feedthrough, or None.
    reset: (..., L) bool; True at step k zeroes the state carried into step k.
    impl: "default" (real GEMMs around the fast scan) or "reference" (the paper's formulation).
  Returns:
    y: (..., L, H) real.
  """
  check_impl(impl)
  if impl == "default":
    return fast_ssm.apply_ssm_planar(lambda_bar, b_bar, c_tilde, u, conj_sym=conj_sym,
                                     bidirectional=bidirectional, D=D, reset=reset)
  bu = project_input(b_bar, u)
  states = scan_states(lambda_bar, bu, bidirectional=bidirectional, reset=reset, impl=impl)
  y = project_output(c_tilde, states, conj_sym)
  return y if D is None else y + D * u


def step(lambda_bar, b_bar, c_tilde, state, u_t, *, conj_sym: bool, D=None):
  """One recurrent step: O(1) in the length of the context.

  Args:
    lambda_bar: (P',) or (..., P') complex.
    b_bar: (P', H) or (..., P', H) complex.
    c_tilde: (H, P') complex.
    state: (..., P') complex, x_{k-1}.
    u_t: (..., H) real.
  Returns:
    (state x_k (..., P') complex, y_k (..., H) real).
  """
  state = lambda_bar * state + jnp.einsum("...ph,...h->...p", b_bar, u_t)
  y = jnp.einsum("hp,...p->...h", c_tilde, state).real
  y = 2 * y if conj_sym else y
  return state, (y if D is None else y + D * u_t)
