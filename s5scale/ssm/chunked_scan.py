"""The chunked XLA linear recurrence x_k = a_k ⊙ x_{k∓1} + b_k in planar arithmetic, and its VJP.

The differentiable entry point and the choice among implementations are in recurrence.py.

Planar: a complex (..., P) array is held as a real (..., 2, P) array (planar_complex.py).

Forward, in three passes over L = C chunks of T steps (the chunk count is chosen per length):
  1. all chunks at once run T steps from a zero state, keeping only each chunk's end state;
  2. the end states are chained across chunks (C steps on small arrays): each chunk's start state;
  3. all chunks run again from their start states, writing every state over its input, in place.
That is two reads of b and one write of x, in 2T + C loop steps instead of L, and no memory
beyond b's own buffer.

Backward: for a real loss, the adjoint of x_k = a_k x_{k-1} + b_k with G = dL/dRe x + i dL/dIm x is
the reverse recurrence G_k = g_k + conj(a_{k+1}) G_{k+1}: the same kernel run the other way, in
place over g. Then dL/db_k = G_k and dL/da_k = G_k conj(x_{k-1}), summed inside that loop when a
is constant. Only the states x are kept from the forward pass (the readout's own gradient needs
them anyway), where autodiff of an associative scan keeps every level of its tree.
"""

import jax.numpy as jnp
from jax import lax

from s5scale.ssm.planar_complex import (apply_parts, complex_multiply, conjugate, conjugate_parts,
                                         multiplier_parts, power)


def num_chunks_for(length: int) -> int:
  """Chunk count C dividing L with the fewest sequential loop steps, 2L/C + C (or L for C = 1).

  A loop step costs a few microseconds however little it does, so chunks trade the L-step loop
  for two T-step loops over wider arrays plus a C-step loop over chunk ends.
  """
  def loop_steps(chunks):
    return length if chunks == 1 else 2 * (length // chunks) + chunks
  small = [c for c in range(1, int(length ** 0.5) + 1) if length % c == 0]
  return min(small + [length // c for c in small], key=loop_steps)


def chain_starts(transfers, ends, reverse: bool):
  """The state entering each of S consecutive segments of time, from what each does alone.

  start_0 = 0 and start_{j+1} = transfer_j ⊙ start_j + end_j (from the last segment backwards
  when reverse), where end_j is segment j's last state when it starts from zero and transfer_j
  the product of its a_k keep_k. S sequential steps on small arrays.

  Args:
    transfers, ends: (S, ..., 2, P) planar, segments along axis 0 in time order.
  Returns:
    (S, ..., 2, P) planar start states.
  """
  def chain(state, segment):
    transfer, end = segment
    return complex_multiply(transfer, state) + end, state

  _, starts = lax.scan(chain, jnp.zeros_like(ends[0]), (transfers, ends), reverse=reverse)
  return starts


def chunked_states(multipliers, inputs, keep, reverse: bool, num_chunks: int | None,
                   correlate=None):
  """The recurrence, no autodiff (recurrence.py gives it its VJP, chunked_backward).

  Args:
    multipliers: (2, P) or (M, L, 2, P) planar a_k.
    inputs: (M, L, 2, P) planar b_k.
    keep: (M, L) real, 0 where the carried state is dropped, or None.
    reverse: False: x_k = a_k keep_k x_{k-1} + b_k; True: x_k = a_k keep_k x_{k+1} + b_k.
    num_chunks: C, a divisor of L; None picks num_chunks_for(L).
    correlate: (M, L, 2, P) planar y, or None. If given, also returns Σ_k keep_k x_{k∓1} ⊙ conj(y_k)
      (2, P): the backward pass's dL/da, summed in the loop rather than by another pass over memory.
  Returns:
    (M, L, 2, P) planar states, and the (2, P) correlation when asked for.
  """
  batch, length = inputs.shape[:2]
  num_chunks = num_chunks or num_chunks_for(length)
  chunk = length // num_chunks
  row_shape = (batch, num_chunks, 1) + inputs.shape[2:]  # one step of every chunk

  def split(array):  # (M, L, ...) -> (M, C, T, ...), free
    return array.reshape((batch, num_chunks, chunk) + array.shape[2:])

  def row(array, k):
    return lax.dynamic_slice_in_dim(array, k, 1, 2)

  varying = multipliers.ndim > 2
  if varying:
    multipliers = split(multipliers)
  else:
    fixed_parts = multiplier_parts(multipliers)
  if keep is not None:
    keep = split(keep)

  def position(t):
    return chunk - 1 - t if reverse else t

  def carried(t, state):
    """keep_k x_{k∓1}, and a_k keep_k x_{k∓1}: (M, C, 1, 2, P)."""
    k = position(t)
    if keep is not None:
      state = state * row(keep, k)[..., None, None]
    parts = multiplier_parts(row(multipliers, k)) if varying else fixed_parts
    return state, apply_parts(parts, state)

  def advance(t, state, buffer):
    return carried(t, state)[1] + row(buffer, position(t))

  buffer = split(inputs)
  zeros = jnp.zeros(row_shape, inputs.dtype)
  if num_chunks == 1:
    start = zeros
  else:
    # Passes 1 and 2: every chunk's end state from zero, then the chain across chunks.
    if varying:
      # The chunk's transfer a_T ... a_1 varies too: carry it along in the same loop.
      def local_step(t, carry):
        state, transfer = carry
        return advance(t, state, buffer), carried(t, transfer)[1]

      ends, transfers = lax.fori_loop(0, chunk, local_step, (zeros, zeros.at[..., 0, :].set(1)))
    else:
      ends = lax.fori_loop(0, chunk, lambda t, state: advance(t, state, buffer), zeros)
      transfers = power(multipliers, chunk)
      if keep is not None:  # a reset anywhere in a chunk cuts its transfer
        transfers = transfers * jnp.prod(keep, axis=2)[..., None, None, None]
    transfers = jnp.broadcast_to(transfers, row_shape)
    starts = chain_starts(jnp.swapaxes(transfers, 0, 1), jnp.swapaxes(ends, 0, 1), reverse)
    start = jnp.swapaxes(starts, 0, 1)

  def write_step(t, carry):
    # Step t's input is read from the buffer just before its state overwrites it, so the states
    # take the inputs' place and XLA allocates nothing more.
    state, buffer, correlation = carry
    kept_state, propagated = carried(t, state)
    state = propagated + row(buffer, position(t))
    if correlate is not None:
      correlation = correlation + apply_parts(conjugate_parts(row(correlate, position(t))),
                                               kept_state)
    return state, lax.dynamic_update_slice_in_dim(buffer, state, position(t), 2), correlation

  if correlate is not None:
    correlate = split(correlate)
  correlation = None if correlate is None else zeros
  _, states, correlation = lax.fori_loop(0, chunk, write_step, (start, buffer, correlation))
  states = states.reshape(inputs.shape)
  if correlate is None:
    return states
  return states, jnp.sum(correlation, axis=(0, 1, 2))


def shift_toward_start(array, reverse: bool):
  """Step k takes the value of step k+1 (k-1 when reverse) along axis 1; the vacated end is 0."""
  pad = jnp.zeros(array.shape[:1] + (1,) + array.shape[2:], array.dtype)
  if reverse:
    return jnp.concatenate([pad, array[:, :-1]], axis=1)
  return jnp.concatenate([array[:, 1:], pad], axis=1)


def chunked_backward(reverse: bool, num_chunks: int | None, residuals, states_cotangent):
  """(dL/da, dL/db, dL/dkeep = 0) from residuals (multipliers, keep, states) and dL/dx; shapes as
  chunked_states."""
  multipliers, keep, states = residuals
  # G_k = g_k + conj(a_{k+1} keep_{k+1}) G_{k+1}, run against the primal direction.
  adjoint_multipliers = conjugate(multipliers)
  varying = multipliers.ndim > 2
  if varying:
    adjoint_multipliers = shift_toward_start(adjoint_multipliers, reverse)
  adjoint_keep = None if keep is None else shift_toward_start(keep, reverse)
  if not varying:
    # Each adjoint step's carried-in keep_{k+1} G_{k+1} (k-1 when reverse), times conj(x_k), is
    # one term of dL/da, so the loop sums them as it goes.
    adjoint, multipliers_cotangent = chunked_states(adjoint_multipliers, states_cotangent,
                                                    adjoint_keep, not reverse, num_chunks,
                                                    correlate=states)
  else:
    adjoint = chunked_states(adjoint_multipliers, states_cotangent, adjoint_keep, not reverse,
                             num_chunks)
    # Per step, dL/da_k = keep_k G_k conj(x_prev(k)), with x_prev = 0 at the sequence's start.
    previous_states = shift_toward_start(states, not reverse)
    multipliers_cotangent = complex_multiply(conjugate(previous_states), adjoint)
    if keep is not None:
      multipliers_cotangent = multipliers_cotangent * keep[..., None, None]
  keep_cotangent = None if keep is None else jnp.zeros_like(keep)
  return multipliers_cotangent, adjoint, keep_cotangent
