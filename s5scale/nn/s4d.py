"""The S4D layer as a Flax module, with the S5 layer's interface (parallel call, carried state, step), so
a residual block holds either. Math from ssm/s4d.py (docs/design.md, "S4D")."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from s5scale import ssm
from s5scale.nn.s5 import zero_state
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

  def __call__(self, u, reset=None, intervals=None, initial_state=None):
    """Parallel mode, three ways to the same numbers: FFT convolution (or, with time split over
    the mesh, the chunked form: ssm.s4d_conv decides); with resets, the chunked form (Toeplitz
    within chunks, the recurrence between them); with per-step intervals, which vary the system
    along time, the recurrence.

    Args:
      u: (batch, L, H) real.
      reset: (batch, L) bool, True where a new document starts (state zeroed before that step).
      intervals: (batch, L) positive real, multiplies Δ at each step (irregular sampling).
      initial_state: (batch, H, N/2) complex, the state entering step 0 (carried from the
        previous window), or None. Causal layers only.
    Returns:
      (batch, L, H) real; with initial_state, (y, final_state (batch, H, N/2) complex).
    """
    u = nn.with_logical_constraint(u, ("batch", "length", "channel"))
    lambda_, c = self._system()
    # The chunk-end states (batch, L/T, 2, H·N/2), H major in the last axis.
    chunk_ends = nn.logical_to_mesh_axes(("batch", "length", None, "channel"))
    common = dict(bidirectional=self.bidirectional, D=self.D, step_rescale=self.step_rescale,
                  initial_state=initial_state)
    if reset is None and intervals is None:
      out = ssm.s4d_conv(lambda_, c, self.log_step, u, sharding=chunk_ends, **common)
    elif intervals is None:
      out = ssm.s4d_chunked(lambda_, c, self.log_step, u, reset=reset, sharding=chunk_ends,
                            **common)
    else:
      out = ssm.s4d_recurrence(lambda_, c, self.log_step, u, reset=reset, intervals=intervals,
                               **common)
    y, final_state = (out, None) if initial_state is None else out
    y = nn.with_logical_constraint(y, ("batch", "length", "channel"))
    return y if initial_state is None else (y, final_state)

  def state_shape(self) -> tuple[int, int]:
    """(H, N/2), from the fields alone (an unbound module answers it)."""
    return (self.d_model, self.state_size // 2)

  def initial_state(self, batch: int):
    """x_0 = 0: (batch, H, N/2) complex."""
    return zero_state(self, batch)

  def step(self, state, u_t, interval=None):
    """Recurrent mode, O(1) per step: state (batch, H, N/2) complex, u_t (batch, H) real,
    interval (batch,) or None -> (state, y_t (batch, H) real)."""
    self._check_causal()
    lambda_, c = self._system()
    return ssm.s4d_step(lambda_, c, self.log_step, state, u_t, D=self.D, interval=interval,
                        step_rescale=self.step_rescale)
