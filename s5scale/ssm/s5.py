"""The S5 recurrence x_k = Λ̄_k ⊙ x_{k−1} + B̄_k u_k and its readout y_k = C̃ x_k + D u_k.

Shapes lead with any batch dims: u (..., L, H) real; states (..., L, P') complex.
"""

import jax.numpy as jnp

from s5scale.ssm import fast_scan
from s5scale.ssm import fast_ssm
from s5scale.ssm import recurrence


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


def scan_states(lambda_bar, bu, *, bidirectional: bool, reset=None, impl: str = "auto"):
  """All states of the recurrence; bidirectional concatenates the reversed scan's states.

  Args:
    lambda_bar: (P',) or (..., L, P') complex.
    bu: (..., L, P') complex.
    reset: (..., L) bool or None.
    impl: recurrence.IMPLS ("auto": Pallas on TPU, chunked elsewhere; "reference":
      associative_scan with plain autodiff).
  Returns:
    (..., L, P') complex, or (..., L, 2P') when bidirectional.
  """
  recurrence.check_impl(impl)
  directions = [False, True] if bidirectional else [False]
  bu_planar, multipliers = fast_scan.to_planar(bu), fast_scan.to_planar(lambda_bar)
  keeps = fast_ssm.keep_masks(reset, bidirectional)
  states = [fast_scan.from_planar(recurrence.linear_recurrence_planar(
      multipliers, bu_planar, keep, reverse, impl=impl)) for reverse, keep in zip(directions, keeps)]
  return jnp.concatenate(states, axis=-1) if bidirectional else states[0]


def apply_ssm(lambda_bar, b_bar, c_tilde, u, *, conj_sym: bool, bidirectional: bool, D=None,
              reset=None, input_scale=None, impl: str = "auto", sharding=None):
  """One S5 SSM over a whole sequence (parallel mode).

  Args:
    lambda_bar: (P',) complex, or (..., L, P') with per-step intervals.
    b_bar: (P', H) complex, or (..., L, P', H).
    c_tilde: (H, P') complex, or (H, 2P') when bidirectional.
    u: (..., L, H) real.
    D: (H,) real feedthrough, or None.
    reset: (..., L) bool; True at step k zeroes the state carried into step k.
    input_scale: (..., L, P') complex or None: step k then uses B̄_k = input_scale_k ⊙ b_bar (a
      time-varying B̄ without an (L, P', H) tensor).
    impl: recurrence.IMPLS. "reference" is the paper's formulation throughout (complex B̄u, an
      associative scan, complex readout); the others are real GEMMs around the planar
      recurrence (fast_ssm.py), which impl runs.
    sharding: PartitionSpec of the planar states (batch, L, 2, P') over the tracing context's
      mesh, for the Pallas kernel's shard_map; None: not sharded.
  Returns:
    y: (..., L, H) real.
  """
  recurrence.check_impl(impl)
  if impl != "reference":
    return fast_ssm.apply_ssm_planar(lambda_bar, b_bar, c_tilde, u, conj_sym=conj_sym,
                                     bidirectional=bidirectional, D=D, reset=reset,
                                     input_scale=input_scale, impl=impl, sharding=sharding)
  bu = project_input(b_bar, u)
  if input_scale is not None:
    bu = bu * input_scale
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
