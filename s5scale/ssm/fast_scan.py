"""Fast linear recurrence (placeholder: same as the reference until the fast scan lands)."""

import jax


def _combine(earlier, later):
  a_earlier, b_earlier = earlier
  a_later, b_later = later
  return a_later * a_earlier, a_later * b_earlier + b_later


def linear_recurrence(multipliers, bu, reverse: bool = False):
  """x_k = a_k x_{k∓1} + b_k over axis -2. multipliers, bu: (..., L, P') complex."""
  _, states = jax.lax.associative_scan(
      _combine, (multipliers, bu), reverse=reverse, axis=bu.ndim - 2)
  return states
