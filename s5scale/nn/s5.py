"""The S5 layer as a Flax module: parameters as in the paper's reference code, math from ssm/."""

import flax.linen as nn
import jax.numpy as jnp

from s5scale import ssm
from s5scale.ssm import init as ssm_init


def zero_state(layer, batch: int):
  """The zero state of an S5 or S4D layer (bound or not): (batch,) + layer.state_shape() complex,
  complex128 for float64 parameters and complex64 otherwise (whatever the compute dtype: the
  recurrence runs in float32)."""
  dtype = jnp.complex128 if jnp.dtype(layer.param_dtype) == jnp.float64 else jnp.complex64
  return jnp.zeros((batch,) + tuple(layer.state_shape()), dtype)


class S5(nn.Module):
  """One MIMO diagonal SSM with P states mapping (batch, L, H) -> (batch, L, H).

  Parameters (P' = P/2 with conj_sym, else P):
    Lambda_re, Lambda_im: (P',); B: (P', H, 2); C: (H, P', 2), or (H, 2P', 2) when bidirectional;
    D: (H,); log_step: (P', 1).
  """
  d_model: int
  ssm_size: int
  blocks: int = 1
  conj_sym: bool = True
  bidirectional: bool = False
  discretization: str = "zoh"
  c_init: str = "trunc_standard_normal"
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  clip_eigs: bool = False
  step_rescale: float = 1.0
  scan_impl: str = "auto"           # one of ssm.IMPLS (recurrence.py)
  param_dtype: jnp.dtype = jnp.float32
  gemm_dtype: jnp.dtype = None      # the B̄ and C̃ GEMMs' operands (bfloat16: f32 accumulation)

  def setup(self):
    ssm_init.validate_ssm_args(discretization=self.discretization, c_init=self.c_init,
                               dt_min=self.dt_min, dt_max=self.dt_max)
    lambda_, v, v_inverse = ssm.make_block_hippo(self.ssm_size, self.blocks, self.conj_sym)
    num_states = lambda_.shape[0]
    dtype = self.param_dtype

    def boxed(init_fn, names):
      # Logical axis names let parallel.py shard P' over `model` (docs/design.md, mesh).
      return nn.with_logical_partitioning(init_fn, names)

    self.Lambda_re = self.param(
        "Lambda_re", boxed(lambda _: jnp.asarray(lambda_.real, dtype), ("state",)))
    self.Lambda_im = self.param(
        "Lambda_im", boxed(lambda _: jnp.asarray(lambda_.imag, dtype), ("state",)))
    self.B = self.param("B", boxed(
        lambda key: ssm_init.init_b(key, v_inverse, self.d_model, dtype), ("state", "embed", None)))
    self.C = self.param("C", boxed(lambda key: ssm_init.init_c(
        key, self.c_init, v, self.d_model, self.bidirectional, dtype), ("embed", "state", None)))
    self.D = self.param("D", boxed(nn.initializers.normal(1.0, dtype), ("embed",)), (self.d_model,))
    self.log_step = self.param("log_step", boxed(lambda key: ssm_init.init_log_step(
        key, num_states, self.dt_min, self.dt_max, dtype), ("state", None)))

  def _discretized(self, intervals=None):
    """Λ̄ and the input factor f (B̄ = f ⊙ B̃), both complex (P',), or intervals.shape + (P',) when
    per-step intervals multiply Δ; also B̃ (P', H) and C̃ (H, P'') complex."""
    lambda_ = ssm.clip_real_part(self.Lambda_re, self.clip_eigs) + 1j * self.Lambda_im
    delta = self.step_rescale * jnp.exp(self.log_step[:, 0])
    if intervals is not None:
      delta = delta * intervals[..., None]
    lambda_bar, input_factor = ssm.discretization_factors(self.discretization, lambda_, delta)
    return lambda_bar, input_factor, ssm_init.as_complex(self.B), ssm_init.as_complex(self.C)

  def _check_causal(self):
    if self.bidirectional:
      raise ValueError("bidirectional=True has no recurrent mode: the backward scan needs the future")

  def __call__(self, u, reset=None, intervals=None, initial_state=None):
    """Parallel mode.

    Args:
      u: (batch, L, H) real.
      reset: (batch, L) bool, True where a new document starts (state zeroed before that step).
      intervals: (batch, L) positive real, multiplies Δ at each step (irregular sampling).
      initial_state: (batch, P') complex, the state entering step 0 (carried from the previous
        window of the same items; a reset at step 0 drops it), or None. Causal layers only.
    Returns:
      (batch, L, H) real; with initial_state, (y, final_state (batch, P') complex): the state
      after step L − 1, the next window's initial_state (or `step`'s state).
    """
    lambda_bar, input_factor, b_tilde, c_tilde = self._discretized(intervals)
    # A time-invariant factor folds into B̄ (P', H); a per-step one scales B̃u instead of building
    # an (L, P', H) B̄.
    varying = intervals is not None
    return ssm.apply_ssm(
        lambda_bar, b_tilde if varying else input_factor[:, None] * b_tilde, c_tilde, u,
        conj_sym=self.conj_sym, bidirectional=self.bidirectional, D=self.D, reset=reset,
        input_scale=input_factor if varying else None, impl=self.scan_impl,
        sharding=self._state_sharding(), gemm_dtype=self.gemm_dtype, initial_state=initial_state)

  @staticmethod
  def _state_sharding():
    """Mesh axes of the planar states (batch, L, 2, P') under the logical rules in context
    (parallel.py's table; all None outside it), for code that runs per device: the Pallas
    kernel, and the context-parallel recurrence when L is split over a `context` axis of more
    than one device (ssm/context_parallel.py)."""
    return nn.logical_to_mesh_axes(("batch", "length", None, "state"))

  def state_shape(self) -> tuple[int]:
    """(P',): P/2 complex states with conj_sym (one of each conjugate pair), else P. From the
    fields alone, so an unbound module answers it."""
    return (self.ssm_size // 2 if self.conj_sym else self.ssm_size,)

  def initial_state(self, batch: int):
    """x_0 = 0: (batch, P') complex."""
    return zero_state(self, batch)

  def step(self, state, u_t, interval=None):
    """Recurrent mode, O(1) per step.

    Args:
      state: (batch, P') complex.
      u_t: (batch, H) real.
      interval: (batch,) positive real or None.
    Returns:
      (state (batch, P') complex, y_t (batch, H) real).
    """
    self._check_causal()
    lambda_bar, input_factor, b_tilde, c_tilde = self._discretized(interval)
    b_bar = input_factor[..., None] * b_tilde  # (P', H), or (batch, P', H) with intervals
    return ssm.step(lambda_bar, b_bar, c_tilde, state, u_t, conj_sym=self.conj_sym, D=self.D)
