"""Continuous → discrete S5 parameters (S5 paper, §2.2 and App. C.1).

Shapes: Lambda (P',) complex; B_tilde (P', H) complex; delta (P',) real, or (..., L, P') when the
step varies along time (irregular sampling). Outputs follow delta's shape.

B̄ is always a per-state factor times B̃, so the layer can apply the factor to B̃u (P' numbers per
step) instead of materialising a time-varying (L, P', H) B̄.
"""

import jax.numpy as jnp

from s5scale.choices import DISCRETIZATIONS


def zoh_factors(lambda_, delta):
  """Zero-order hold: Λ̄ = exp(ΛΔ) and input factor (Λ̄ − 1)/Λ, both delta.shape complex."""
  lambda_bar = jnp.exp(lambda_ * delta)
  return lambda_bar, (lambda_bar - 1) / lambda_


def bilinear_factors(lambda_, delta):
  """Bilinear: Λ̄ = (1 + ΔΛ/2)/(1 − ΔΛ/2) and input factor Δ/(1 − ΔΛ/2), delta.shape complex."""
  inverse_denominator = 1 / (1 - (delta / 2) * lambda_)
  return inverse_denominator * (1 + (delta / 2) * lambda_), inverse_denominator * delta


def discretization_factors(method: str, lambda_, delta):
  """(Λ̄, input factor) for method "zoh" or "bilinear"."""
  if method == "zoh":
    return zoh_factors(lambda_, delta)
  if method == "bilinear":
    return bilinear_factors(lambda_, delta)
  raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {method!r}")


def discretize_zoh(lambda_, b_tilde, delta):
  """Returns Λ̄ (delta.shape) and B̄ = (Λ̄ − 1)/Λ · B̃ (delta.shape + (H,)), complex."""
  lambda_bar, factor = zoh_factors(lambda_, delta)
  return lambda_bar, factor[..., None] * b_tilde


def discretize_bilinear(lambda_, b_tilde, delta):
  """Returns Λ̄ (delta.shape) and B̄ = Δ/(1 − ΔΛ/2) · B̃ (delta.shape + (H,)), complex."""
  lambda_bar, factor = bilinear_factors(lambda_, delta)
  return lambda_bar, factor[..., None] * b_tilde


def clip_real_part(lambda_re, clip_eigs: bool):
  """clip_eigs keeps every mode strictly stable: Re Λ ≤ −1e-4."""
  return jnp.minimum(lambda_re, -1e-4) if clip_eigs else lambda_re
