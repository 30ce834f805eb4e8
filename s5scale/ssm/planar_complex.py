"""Planar complex arithmetic: a complex (..., P) array held as a real (..., 2, P) array, [real
parts; imaginary parts].

Why planar: the S5 projections then are real GEMMs (s5.py), the recurrence runs on contiguous real
lanes (chunked_scan.py, pallas_scan.py), and an axis P sharded across devices keeps each state's
two parts on the same device.

Products are written with a swap of the two parts (a reverse along the axis of 2) and a broadcast
of one part, never by slicing parts apart and stacking them again: XLA fuses the former with a
loop step's other arithmetic and its in-place write, while a stack (concatenate) stays a separate
op with its own copy on every step of the loops.
"""

import jax.numpy as jnp
from jax import lax


def to_planar(z):
  """(..., P) complex -> (..., 2, P) real."""
  return jnp.stack([z.real, z.imag], axis=-2)


def from_planar(x):
  """(..., 2, P) real -> (..., P) complex."""
  return lax.complex(x[..., 0, :], x[..., 1, :])


def swap_parts(x):
  """(..., 2, P): [re; im] -> [im; re]."""
  return jnp.flip(x, axis=-2)


def multiplier_parts(m):
  """(..., 2, P) m -> ([Re m; Re m], [−Im m; Im m]): m ⊙ x = apply_parts(these, x)."""
  sign = jnp.array([[-1], [1]], m.dtype)
  return jnp.broadcast_to(m[..., :1, :], m.shape), m[..., 1:, :] * sign


def conjugate_parts(y):
  """(..., 2, P) y -> ([Re y; Re y], [Im y; −Im y]): x ⊙ conj(y) = apply_parts(these, x)."""
  sign = jnp.array([[1], [-1]], y.dtype)
  return jnp.broadcast_to(y[..., :1, :], y.shape), y[..., 1:, :] * sign


def apply_parts(parts, x):
  """same * x + cross * swap(x), for (same, cross) from multiplier_parts or conjugate_parts.

  Splitting a product in two lets a loop compute a constant multiplier's parts once, outside it.
  """
  same, cross = parts
  return same * x + cross * swap_parts(x)


def complex_multiply(m, x):
  """Planar m ⊙ x; m (..., 2, P) broadcasts against x (..., 2, P)."""
  return apply_parts(multiplier_parts(m), x)


def conjugate(m):
  """Planar conj(m). m: (..., 2, P)."""
  return m * jnp.array([[1], [-1]], m.dtype)


def power(m, exponent: int):
  """Planar m ** exponent by repeated squaring. m: (2, P)."""
  result = jnp.zeros_like(m).at[0].set(1)
  while exponent:
    if exponent & 1:
      result = complex_multiply(m, result)
    m = complex_multiply(m, m)
    exponent >>= 1
  return result
