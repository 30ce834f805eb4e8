"""S4D's chunked form (s4d.py): the SSM with resets (packed documents), a carried initial state,
or time split over the mesh, without a state per step.

A convolution cannot reset its state, so within chunks of T steps a masked (T, T) Toeplitz
product runs, and the project's linear recurrence carries the state from chunk end to chunk end:
states exist only at chunk ends, (..., L/T, H, N/2), T times fewer than s4d_states builds.

Shapes as s4d.py: Lambda (H, N/2) complex; C (H, N/2) or (2, H, N/2) complex; log_step (H,);
u (..., L, H) real.
"""

import jax.numpy as jnp

from s5scale.ssm import recurrence
from s5scale.ssm.planar_complex import complex_multiply, from_planar, to_planar
from s5scale.ssm.s4d_kernel import HIGHEST, discretized, run_recurrence, s4d_kernel


def _chunk_masks(reset, chunk: int):
  """Which inputs reach which outputs inside chunks of `chunk` steps, from forward resets.

  With r the resets counted from the chunk's start (inclusive), u_s reaches x_t (s ≤ t) exactly
  when no reset lies in (s, t], i.e. r_s = r_t.

  Args:
    reset: (..., L) bool, L a multiple of chunk.
  Returns:
    within (..., L/T, T, T): u_s reaches y_t inside the chunk;
    carried (..., L/T, T): the state entering the chunk reaches y_t;
    to_end (..., L/T, T): u_s reaches the chunk's last state.
  """
  resets = jnp.cumsum(reset.reshape(reset.shape[:-1] + (-1, chunk)).astype(jnp.int32), axis=-1)
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  within = (resets[..., :, None] == resets[..., None, :]) & causal
  return within, resets == 0, resets == resets[..., -1:]


def _toeplitz(kernel):
  """(H, T) kernel -> (H, T, T) lower-triangular Toeplitz matrices, [h, t, s] = K[h, t − s]."""
  chunk = kernel.shape[-1]
  lags = jnp.arange(chunk)[:, None] - jnp.arange(chunk)[None, :]
  return jnp.where(lags >= 0, kernel[:, jnp.maximum(lags, 0)], 0)


def _planar_powers(factor, exponent, powers):
  """factor·Λ̄^k for each k in powers as planar (K, 2, H, N/2): factor, exponent (H, N/2) complex."""
  values = factor * jnp.exp(exponent * powers[:, None, None])
  return jnp.stack([values.real, values.imag], axis=1)


def _inputs_into(chunk_inputs, reaches, input_factor, exponent, position, dtype):
  """Σ_s (Λ̄−1)/Λ · Λ̄^{position−s} u_s over the steps s that reach `position` in their chunk.

  chunk_inputs (..., T, H); reaches (..., T) bool. Returns planar (..., 2, H·N/2). Steps after
  `position` must have zero inputs (padding); their powers are clipped at 0 to stay finite.
  """
  steps = jnp.arange(chunk_inputs.shape[-2], dtype=jnp.real(exponent).dtype)
  powers = _planar_powers(input_factor, exponent, jnp.maximum(position - steps, 0)).astype(dtype)
  into = jnp.einsum("...sh,sphn->...phn", chunk_inputs * reaches[..., None].astype(dtype), powers,
                    precision=HIGHEST)
  return into.reshape(into.shape[:-2] + (-1,))


def _forward_chunked(Lambda, C, log_step, u, reset, chunk: int, step_rescale, sharding,
                     initial_state, last_step: int):
  """One forward direction, no D: u (..., L, H), reset (..., L), L = a multiple of T.

  Three parts per chunk of T steps: the chunk's own inputs through the masked (T, T) Toeplitz
  kernel; the state entering the chunk, read out through C Λ̄^{t+1}; and the chunk's last state,
  carried from chunk to chunk by the project's recurrence over L/T steps, from initial_state.

  initial_state: planar (..., 2, H·N/2) or None (zero). last_step: the index, in the last chunk,
  of the last real step (T − 1 unless the end is padding).
  Returns y (..., L, H) and, with initial_state, the planar state after the last real step
  (..., 2, H·N/2).
  """
  *batch, length, channels = u.shape
  within, carried, to_end = _chunk_masks(reset, chunk)
  chunks = u.reshape(*batch, length // chunk, chunk, channels)             # (..., A, T, H)
  dtype = u.dtype
  toeplitz = _toeplitz(s4d_kernel(Lambda, C, log_step, chunk, step_rescale=step_rescale))
  y = jnp.einsum("...ats,hts,...ash->...ath", within.astype(dtype), toeplitz.astype(dtype),
                 chunks, precision=HIGHEST)
  lambda_bar, input_factor, exponent = discretized(Lambda, log_step, step_rescale)
  local = _inputs_into(chunks, to_end, input_factor, exponent, chunk - 1, dtype)  # (..., A, 2, HN/2)
  chunk_decay = to_planar((lambda_bar ** chunk).reshape(-1)).astype(dtype)
  ends = run_recurrence(chunk_decay, local, carried[..., -1].astype(dtype), reverse=False,
                        sharding=sharding, initial_state=initial_state)
  first = jnp.zeros_like(ends[..., :1, :, :]) if initial_state is None else (
      initial_state[..., None, :, :].astype(dtype))
  entering = jnp.concatenate([first, ends[..., :-1, :, :]], axis=-3)        # (..., A, 2, HN/2)
  # 2·Re(C Λ̄^{t+1} x) = 2(Re(CΛ̄^{t+1}) Re x − Im(CΛ̄^{t+1}) Im x).
  steps = jnp.arange(chunk, dtype=jnp.real(exponent).dtype)
  readout_powers = _planar_powers(C, exponent, steps + 1) * jnp.asarray([1, -1])[:, None, None]
  y = y + 2 * carried[..., None].astype(dtype) * jnp.einsum(
      "...aphn,tphn->...ath", entering.reshape(entering.shape[:-1] + Lambda.shape),
      readout_powers.astype(dtype), precision=HIGHEST)
  y = y.reshape(u.shape)
  if initial_state is None:
    return y, None
  if last_step == chunk - 1:
    return y, ends[..., -1, :, :]
  # The end is padding: the state after the last real step is the last chunk's entering state
  # carried to it plus that chunk's inputs up to it (dividing ends[-1] by Λ̄^padding could
  # overflow for fast-decaying states).
  decay = to_planar((lambda_bar ** (last_step + 1)).reshape(-1)).astype(dtype)
  final = _inputs_into(chunks[..., -1, :, :], to_end[..., -1, :], input_factor, exponent,
                       last_step, dtype)
  reached = carried[..., -1, last_step, None, None].astype(dtype)
  return y, final + reached * complex_multiply(decay, entering[..., -1, :, :])


def s4d_chunked(Lambda, C, log_step, u, *, bidirectional: bool, reset=None, D=None,
                step_rescale=1.0, chunk_size: int = 16, sharding=None, initial_state=None):
  """The same SSM as s4d_recurrence with resets (packed documents), without a state per step.

  Per chunk of T steps a masked (T, T) Toeplitz product, plus the chunk-end states carried by the
  recurrence: O(L·T·H + L·H·N) work and (L/T)·H·N/2 states, where s4d_recurrence keeps L·H·N/2
  (text_small with N = 256: 16× less memory). The backward direction runs forward in reversed
  time. Per-step intervals vary Λ̄ along time and need s4d_recurrence.

  T = 16 balances the two costs: fwd+bwd of one text_small layer (batch 4, L 512, H 256, N 256)
  took 0.62, 0.37, 0.42, 0.84 and 1.61 s at T = 8, 16, 32, 64 and 128 on 2 shared CPU cores, and
  3.7 s through s4d_recurrence.

  Time split over the mesh (context parallelism): everything but the chunk-end recurrence is
  local to a chunk, so with `sharding` naming the split (PartitionSpec of the chunk-end states
  (..., L/T, 2, H·N/2)) that recurrence runs context-parallel (one all-gather of segment end
  states) and each device keeps its own segment of time, as long as a segment holds whole chunks.

  Args:
    as s4d_conv, plus reset (..., L) bool (True where a new document starts) or None, and
    chunk_size T.
  Returns:
    y: (..., L, H) real; with initial_state, (y, final_state (..., H, N/2) complex).
  """
  recurrence.check_carried(initial_state, bidirectional)
  length = u.shape[-2]
  chunk = min(chunk_size, length)
  padding = -length % chunk
  if reset is None:
    reset = jnp.zeros(u.shape[:-1], bool)
  entering = None if initial_state is None else to_planar(
      initial_state.reshape(initial_state.shape[:-2] + (-1,)))

  def forward(c_direction, inputs, resets):
    # Zeros after the end never reach an earlier output of a forward direction.
    inputs = jnp.pad(inputs, [(0, 0)] * (inputs.ndim - 2) + [(0, padding), (0, 0)])
    resets = jnp.pad(resets, [(0, 0)] * (resets.ndim - 1) + [(0, padding)])
    y, final = _forward_chunked(Lambda, c_direction, log_step, inputs, resets, chunk,
                                step_rescale, sharding, entering, (length - 1) % chunk)
    return y[..., :length, :], final

  if not bidirectional:
    y, final = forward(C, u, reset)
  else:
    # Reversed time: the state carried from k+1 into k is dropped where reset[k+1].
    reversed_reset = jnp.concatenate([jnp.zeros_like(reset[..., :1]),
                                      jnp.flip(reset, axis=-1)[..., :-1]], axis=-1)
    y = forward(C[0], u, reset)[0] + jnp.flip(
        forward(C[1], jnp.flip(u, axis=-2), reversed_reset)[0], axis=-2)
  y = y if D is None else y + D * u
  if initial_state is None:
    return y
  return y, from_planar(final).reshape(initial_state.shape)
