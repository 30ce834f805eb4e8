"""The S4D layer as a Flax module, with the S5 layer's interface (parallel call, prefill, step), so
a residual block holds either. Math from ssm/s4d.py (docs/design.md, "S4D")."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from s5scale import ssm
from s5scale.ssm import init as ssm_init


class S4D(nn.Module):
  """H independent SISO diagonal SSMs with N/2 complex states each: (batch, L, H) -> (batch, L, H).

  Parameters: Lambda_re, Lambda_im (H, N/2); C (H, N/2, 2), or (2, H, N/2, 2) when bidirectional
  (forward, backward); D (H,); log_step (H,). Names match S5's, so optim.py puts Λ and log Δ in
  the SSM group (own rate, no weight decay). H carries the logical name "channel" (sharded over
  `model`): channels never interact inside the layer, so a device convolves its own H/model.
  """
  d_model: int
  state_size: int = 64             # N
  lambda_init: str = "legs"        # "legs" (HiPPO-N eigenvalues, as S5) or "lin"
  bidirectional: bool = False
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  clip_eigs: bool = False
  step_rescale: float = 1.0
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    ssm_init.validate_s4d_args(state_size=self.state_size, init=self.lambda_init,
                               dt_min=self.dt_min, dt_max=self.dt_max)
    lambda_ = np.tile(ssm_init.make_s4d_lambda(self.state_size, self.lambda_init),
                      (self.d_model, 1))
    dtype = self.param_dtype

    def boxed(init_fn, names):
      return nn.with_logical_partitioning(init_fn, names)

    self.Lambda_re = self.param(
        "Lambda_re", boxed(lambda _: jnp.asarray(lambda_.real, dtype), ("channel", None)))
    self.Lambda_im = self.param(
        "Lambda_im", boxed(lambda _: jnp.asarray(lambda_.imag, dtype), ("channel", None)))
    c_shape = lambda_.shape if not self.bidirectional else (2,) + lambda_.shape
    c_names = ("channel", None, None) if not self.bidirectional else (None, "channel", None, None)
    self.C = self.param("C", boxed(lambda key: ssm_init.init_s4d_c(key, c_shape, dtype), c_names))
    self.D = self.param("D", boxed(nn.initializers.normal(1.0, dtype), ("channel",)),
                        (self.d_model,))
    self.log_step = self.param("log_step", boxed(lambda key: ssm_init.init_s4d_log_step(
        key, self.d_model, self.dt_min, self.dt_max, dtype), ("channel",)))

  def _system(self):
    """Λ (H, N/2) complex, C (H, N/2) or (2, H, N/2) complex."""
    lambda_ = ssm.clip_real_part(self.Lambda_re, self.clip_eigs) + 1j * self.Lambda_im
    return lambda_, ssm_init.as_complex(self.C)

  def _check_causal(self):
    if self.bidirectional:
      raise ValueError("bidirectional=True has no recurrent mode: the backward kernel needs the "
                       "future")

  def __call__(self, u, reset=None, intervals=None):
    """Parallel mode, three ways to the same numbers: FFT convolution; with resets, the chunked
    form (Toeplitz within chunks, the recurrence between them); with per-step intervals, which
    vary the system along time, the recurrence.

    Args:
      u: (batch, L, H) real.
      reset: (batch, L) bool, True where a new document starts (state zeroed before that step).
      intervals: (batch, L) positive real, multiplies Δ at each step (irregular sampling).
    Returns:
      (batch, L, H) real.
    """
    u = nn.with_logical_constraint(u, ("batch", "length", "channel"))
    lambda_, c = self._system()
    # The chunk-end states (batch, L/T, 2, H·N/2), H major in the last axis.
    chunk_ends = nn.logical_to_mesh_axes(("batch", "length", None, "channel"))
    if reset is None and intervals is None and ssm.time_axis(chunk_ends) is not None:
      # Time split over the mesh: a whole-sequence FFT would gather it; the chunked form keeps
      # each device on its own segment and hands the state across segments.
      reset = jnp.zeros(u.shape[:-1], bool)
    if reset is None and intervals is None:
      y = ssm.s4d_conv(lambda_, c, self.log_step, u, bidirectional=self.bidirectional, D=self.D,
                       step_rescale=self.step_rescale)
    elif intervals is None:
      y = ssm.s4d_chunked(lambda_, c, self.log_step, u, bidirectional=self.bidirectional,
                          reset=reset, D=self.D, step_rescale=self.step_rescale,
                          sharding=chunk_ends)
    else:
      y = ssm.s4d_recurrence(lambda_, c, self.log_step, u, bidirectional=self.bidirectional,
                             D=self.D, reset=reset, intervals=intervals,
                             step_rescale=self.step_rescale)
    return nn.with_logical_constraint(y, ("batch", "length", "channel"))

  def final_state(self, u, reset=None):
    """The state after a whole sequence (prompt prefill): (batch, H, N/2) complex."""
    self._check_causal()
    lambda_, _ = self._system()
    states = ssm.s4d_states(lambda_, self.log_step, u, reset=reset,
                            step_rescale=self.step_rescale)
    last = states[..., -1, :, :, :]                  # (batch, 2, H, N/2) planar
    return jax.lax.complex(last[..., 0, :, :], last[..., 1, :, :])

  def initial_state(self, batch: int):
    """x_0 = 0: (batch, H, N/2) complex."""
    dtype = jnp.complex128 if self.param_dtype == jnp.float64 else jnp.complex64
    return jnp.zeros((batch,) + self.Lambda_re.shape, dtype)

  def step(self, state, u_t, interval=None):
    """Recurrent mode, O(1) per step: state (batch, H, N/2) complex, u_t (batch, H) real,
    interval (batch,) or None -> (state, y_t (batch, H) real)."""
    self._check_causal()
    lambda_, c = self._system()
    return ssm.s4d_step(lambda_, c, self.log_step, state, u_t, D=self.D, interval=interval,
                        step_rescale=self.step_rescale)
