"""Initialisers for B̃, C̃ and log Δ, and argument validation (S5 paper, App. B).

Complex parameters are stored as a trailing (real, imaginary) axis of size 2, as in the paper's
reference code, so optimisers and checkpoints only ever see real arrays.
"""

import jax
import jax.numpy as jnp
import numpy as np

from s5scale.ssm.discretize import DISCRETIZATIONS

C_INITS = ("trunc_standard_normal", "lecun_normal", "complex_normal")


def validate_ssm_args(*, discretization: str, c_init: str, dt_min: float, dt_max: float) -> None:
  if discretization not in DISCRETIZATIONS:
    raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {discretization!r}")
  if c_init not in C_INITS:
    raise ValueError(f"c_init must be one of {C_INITS}, got {c_init!r}")
  if not dt_min > 0:
    raise ValueError(f"dt_min must be > 0, got {dt_min}")
  if dt_min > dt_max:
    raise ValueError(f"dt_min={dt_min} must be <= dt_max={dt_max}")


def as_real_pair(z):
  """(..., n) complex -> (..., n, 2) real."""
  return jnp.stack([z.real, z.imag], axis=-1)


def as_complex(pair):
  """(..., n, 2) real -> (..., n) complex."""
  return pair[..., 0] + 1j * pair[..., 1]


def init_b(key, v_inverse: np.ndarray, d_model: int, dtype=jnp.float32):
  """B̃ = V⁻¹ B with B (P, H) lecun-normal over the P states, as the reference code draws it.

  Returns:
    (P', H, 2) real.
  """
  num_full_states = v_inverse.shape[1]
  b = jax.nn.initializers.lecun_normal()(key, (num_full_states, d_model), dtype)
  return as_real_pair(jnp.asarray(v_inverse) @ b).astype(dtype)


def init_c(key, c_init: str, v: np.ndarray, d_model: int, bidirectional: bool, dtype=jnp.float32):
  """C̃ for the readout; bidirectional stacks a second, independent C̃ for the backward states.

  trunc_standard_normal / lecun_normal draw a real C (H, P) and use C̃ = C V;
  complex_normal draws C̃ (H, P') directly with std sqrt(1/2) per part.

  Returns:
    (H, P', 2) real, or (H, 2P', 2) when bidirectional.
  """
  num_full_states, num_states = v.shape
  directions = 2 if bidirectional else 1
  keys = jax.random.split(key, directions)
  parts = []
  for direction_key in keys:
    if c_init == "complex_normal":
      parts.append(jax.random.normal(direction_key, (d_model, num_states, 2), dtype)
                   * np.sqrt(0.5))
      continue
    if c_init == "trunc_standard_normal":
      # Truncated normal scaled by the number of states, as the reference's per-row draw.
      c = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-1)(
          direction_key, (d_model, num_full_states), dtype)
    elif c_init == "lecun_normal":
      c = jax.nn.initializers.lecun_normal()(direction_key, (d_model, num_full_states), dtype)
    else:
      raise ValueError(f"c_init must be one of {C_INITS}, got {c_init!r}")
    parts.append(as_real_pair(c @ jnp.asarray(v)))
  return jnp.concatenate(parts, axis=1).astype(dtype)


def init_log_step(key, num_states: int, dt_min: float, dt_max: float, dtype=jnp.float32):
  """log Δ ~ U[log dt_min, log dt_max] per state. Returns (P', 1) real."""
  return jax.random.uniform(key, (num_states, 1), dtype, np.log(dt_min), np.log(dt_max))
