"""The S5 operator: the recurrence x_k = Λ̄_k ⊙ x_{k−1} + B̄_k u_k and its readout
y_k = C̃ x_k + D u_k, in two formulations with the same numbers.

Reference (impl="reference"): the paper's complex arithmetic throughout (project_input,
scan_states, project_output), and `step`, the O(1) recurrent form.

Planar (every other impl): B̄ and C̃ as one real GEMM each around the planar recurrence
(planar_complex.py). With planar states x = [Re x; Im x] (2, P'):
  B̄u     = u @ [Re B̄ᵀ; Im B̄ᵀ]     (N, H) @ (H, 2, P') -> (N, 2, P')
  Re(C̃x) = x @ [Re C̃ᵀ; −Im C̃ᵀ]   (N, 2, P') @ (2, P', H) -> (N, H)
with N = batch × L, so no complex tensor of length L is ever built.

apply_ssm is the public entry point and picks the formulation from impl (recurrence.py).
Shapes lead with any batch dims: u (..., L, H) real; states (..., L, P') complex.
"""

import jax
import jax.numpy as jnp

from s5scale.ssm import mesh_spec
from s5scale.ssm import recurrence
from s5scale.ssm.planar_complex import complex_multiply, from_planar, to_planar


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


def scan_states(lambda_bar, bu, *, bidirectional: bool, reset=None, impl: str = "auto",
                initial_state=None):
  """All states of the recurrence; bidirectional concatenates the reversed scan's states.

  Args:
    lambda_bar: (P',) or (..., L, P') complex.
    bu: (..., L, P') complex.
    reset: (..., L) bool or None.
    impl: recurrence.IMPLS ("auto": Pallas on TPU, chunked elsewhere; "reference":
      associative_scan with plain autodiff).
    initial_state: (..., P') complex state entering step 0 (forward only), or None: zero.
  Returns:
    (..., L, P') complex, or (..., L, 2P') when bidirectional.
  """
  recurrence.check_impl(impl)
  recurrence.check_carried(initial_state, bidirectional)
  directions = [False, True] if bidirectional else [False]
  bu_planar, multipliers = to_planar(bu), to_planar(lambda_bar)
  keeps = recurrence.keep_masks(reset, bidirectional)
  entering = None if initial_state is None else to_planar(initial_state)
  states = [from_planar(recurrence.linear_recurrence_planar(multipliers, bu_planar, keep, reverse,
                                                            impl=impl, initial_state=entering))
            for reverse, keep in zip(directions, keeps)]
  return jnp.concatenate(states, axis=-1) if bidirectional else states[0]


def apply_ssm(lambda_bar, b_bar, c_tilde, u, *, conj_sym: bool, bidirectional: bool, D=None,
              reset=None, input_scale=None, impl: str = "auto", sharding=None, gemm_dtype=None,
              initial_state=None):
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
      recurrence (apply_ssm_planar), which impl runs.
    sharding: PartitionSpec of the planar states (batch, L, 2, P') over the tracing context's
      mesh, for the Pallas kernel's shard_map and, when it splits time over a mesh axis of more
      than one device, the context-parallel recurrence (recurrence.linear_recurrence_planar);
      None: not sharded.
    gemm_dtype: operand dtype of the planar B̄ and C̃ GEMMs (bfloat16: float32 accumulation,
      and the states stay float32); None: the operands' own. The reference formulation's complex
      arithmetic ignores it.
    initial_state: (..., P') complex, the state entering step 0 (a window that continues the
      previous one: carried state); a reset at step 0 drops it. Causal layers only.
  Returns:
    y: (..., L, H) real; with initial_state, (y, final_state): final_state (..., P') complex,
    the state after step L − 1, to enter the next window.
  """
  recurrence.check_impl(impl)
  if impl != "reference":
    return apply_ssm_planar(lambda_bar, b_bar, c_tilde, u, conj_sym=conj_sym,
                            bidirectional=bidirectional, D=D, reset=reset,
                            input_scale=input_scale, impl=impl, sharding=sharding,
                            gemm_dtype=gemm_dtype, initial_state=initial_state)
  bu = project_input(b_bar, u)
  if input_scale is not None:
    bu = bu * input_scale
  states = scan_states(lambda_bar, bu, bidirectional=bidirectional, reset=reset, impl=impl,
                       initial_state=initial_state)
  y = project_output(c_tilde, states, conj_sym)
  y = y if D is None else y + D * u
  return y if initial_state is None else (y, states[..., -1, :])


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


# ----------------------------------------------------------------------------- planar

def input_matrix(b_bar):
  """(P', H) complex B̄ -> (H, 2, P') real: u @ it is planar B̄u."""
  return jnp.stack([b_bar.real.T, b_bar.imag.T], axis=1)


def output_matrix(c_tilde, conj_sym: bool):
  """(H, P') complex C̃ -> (2, P', H) real: planar x @ it is Re(C̃x), doubled with conj_sym."""
  matrix = jnp.stack([c_tilde.real.T, -c_tilde.imag.T], axis=0)
  return 2 * matrix if conj_sym else matrix


# The projections define their own VJP to choose the operand order of each gradient GEMM: XLA's
# CPU dot reads "...h,...cp->hcp" (the weight gradient, contracting the long axes) in place, while
# the order that autodiff derives makes it transpose the whole (..., 2, P') operand first. It also
# keeps the gradient GEMMs in the operands' dtype (bfloat16 operands, float32 accumulation).

def _accumulating_einsum(spec: str, lhs, rhs):
  """einsum whose products accumulate in at least float32, whatever the operands' dtype.

  Narrow (bfloat16) operands go to the GEMM as they are, except on CPU: XLA's CPU runtime has no
  bfloat16 x bfloat16 -> float32 kernel for some of these contractions ("nh,ncp->hcp"), so there
  they are widened first. The product of two bfloat16 numbers is exact in float32, so both
  branches compute the same sums.
  """
  accumulate = jnp.promote_types(lhs.dtype, jnp.float32)
  if lhs.dtype == accumulate:
    return jnp.einsum(spec, lhs, rhs)
  widened = lambda a, b: jnp.einsum(spec, a.astype(accumulate), b.astype(accumulate))
  narrow = lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=accumulate)
  return jax.lax.platform_dependent(lhs, rhs, cpu=widened, default=narrow)


def _gemm_with_vjp(forward: str, lhs_gradient, rhs_gradient):
  """einsum(forward, lhs, rhs) whose VJP is lhs_gradient(cotangent, rhs) and
  rhs_gradient(lhs, cotangent), with the cotangent in the operands' dtype; each gradient is cast
  back to its operand's dtype."""
  @jax.custom_vjp
  def gemm(lhs, rhs):
    return _accumulating_einsum(forward, lhs, rhs)

  def gemm_forward(lhs, rhs):
    return gemm(lhs, rhs), (lhs, rhs)

  def gemm_backward(residuals, cotangent):
    lhs, rhs = residuals
    cotangent = cotangent.astype(lhs.dtype)
    return (lhs_gradient(cotangent, rhs).astype(lhs.dtype),
            rhs_gradient(lhs, cotangent).astype(rhs.dtype))

  gemm.defvjp(gemm_forward, gemm_backward)
  return gemm


# (..., H) @ (H, 2, P') -> (..., 2, P')
_rows_to_planar = _gemm_with_vjp(
    "...h,hcp->...cp",
    lhs_gradient=lambda cotangent, matrix: _accumulating_einsum("...cp,hcp->...h", cotangent,
                                                                matrix),
    rhs_gradient=lambda rows, cotangent: _accumulating_einsum("...h,...cp->hcp", rows, cotangent))

# (..., 2, P') @ (2, P', H) -> (..., H)
_planar_to_rows = _gemm_with_vjp(
    "...cp,cph->...h",
    lhs_gradient=lambda cotangent, matrix: _accumulating_einsum("...h,cph->...cp", cotangent,
                                                                matrix),
    rhs_gradient=lambda states, cotangent: _accumulating_einsum(
        "...h,...cp->hcp", cotangent, states).transpose(1, 2, 0))


def _operand_dtype(rows, matrix, gemm_dtype):
  return jnp.result_type(rows, matrix) if gemm_dtype is None else gemm_dtype


def project_input_planar(b_bar, u, gemm_dtype=None, *, flatten: bool = True):
  """(P', H) complex B̄, (..., L, H) real u -> planar B̄u (..., L, 2, P'), as one GEMM.

  gemm_dtype: the GEMM's operand dtype (bfloat16: float32 accumulation and result); None: u's
  and B̄'s own.
  flatten: run it on (N, H) rows, N = every leading dim. False keeps the leading dims, for a time
  axis split over the mesh: merging it with batch would make XLA gather it.
  """
  rows = u.reshape(-1, u.shape[-1]) if flatten else u
  matrix = input_matrix(b_bar)
  dtype = _operand_dtype(rows, matrix, gemm_dtype)
  return _rows_to_planar(rows.astype(dtype), matrix.astype(dtype)).reshape(
      u.shape[:-1] + matrix.shape[1:])


def project_output_planar(c_tilde, states, conj_sym: bool, gemm_dtype=None, *,
                          flatten: bool = True):
  """(H, P') complex C̃, planar (..., L, 2, P') x -> Re(C̃x) (..., L, H), as one GEMM; gemm_dtype
  and flatten as in project_input_planar."""
  rows = states.reshape((-1,) + states.shape[-2:]) if flatten else states
  matrix = output_matrix(c_tilde, conj_sym)
  dtype = _operand_dtype(rows, matrix, gemm_dtype)
  return _planar_to_rows(rows.astype(dtype), matrix.astype(dtype)).reshape(
      states.shape[:-2] + matrix.shape[-1:])


def apply_ssm_planar(lambda_bar, b_bar, c_tilde, u, *, conj_sym: bool, bidirectional: bool, D=None,
                     reset=None, input_scale=None, impl: str = "auto", sharding=None,
                     gemm_dtype=None, initial_state=None):
  """One S5 SSM over a whole sequence, as apply_ssm (same arguments and shapes), computed with
  real GEMMs around the planar recurrence that `impl` runs (recurrence.linear_recurrence_planar).

  Returns:
    y: (..., L, H), u's dtype; with initial_state, (y, final_state (..., P') complex).
  """
  recurrence.check_carried(initial_state, bidirectional)
  flatten = mesh_spec.time_axis(sharding) is None
  if b_bar.ndim == 2:
    bu = project_input_planar(b_bar, u, gemm_dtype, flatten=flatten)
  else:
    bu = to_planar(jnp.einsum("...lph,...lh->...lp", b_bar, u))
  if input_scale is not None:
    bu = complex_multiply(to_planar(input_scale), bu)
  multipliers = to_planar(lambda_bar)
  num_states = bu.shape[-1]
  y = None
  # The backward direction derives its own keep from the forward one (recurrence.py).
  keep = recurrence.keep_masks(reset, bidirectional=False)[0]
  if bidirectional:  # both directions at once: split over context, they share one all-gather
    all_states = recurrence.bidirectional_recurrence_planar(multipliers, bu, keep, impl=impl,
                                                            sharding=sharding)
  else:
    entering = None if initial_state is None else to_planar(initial_state)
    all_states = [recurrence.linear_recurrence_planar(multipliers, bu, keep, False, impl=impl,
                                                      sharding=sharding, initial_state=entering)]
  for direction, states in enumerate(all_states):
    readout = c_tilde[:, direction * num_states:(direction + 1) * num_states]
    direction_y = project_output_planar(readout, states, conj_sym, gemm_dtype, flatten=flatten)
    y = direction_y if y is None else y + direction_y
  y = y if D is None else y + D * u
  return y if initial_state is None else (y, from_planar(states[..., -1, :, :]))
