"""The linear recurrence x_k = a_k ⊙ keep_k x_{k∓1} + b_k: the one place that picks how it runs.

Implementations (`impl`, the config key model.scan_impl):
  "auto"       the default: the Pallas kernel when the program is compiled for TPU, the chunked
               XLA scan on any other platform. Chosen at lowering time from the platform the
               program is compiled for (lax.platform_dependent), not from the host's default
               backend, so compiling ahead of time for a TPU topology on a CPU host (tools/
               aot_compile.py) gets the kernel, and a CPU run never traces into Mosaic.
  "chunked"    three passes of XLA loops over chunks of time (chunked_scan.py); any platform.
  "pallas"     one pass of a Pallas TPU kernel that keeps the state in VMEM (pallas_scan.py);
               TPU only, or interpret=True (tests) on CPU.
  "reference"  the paper's formulation: jax.lax.associative_scan over complex (a, b) pairs, with
               plain autodiff (every level of its tree is kept for the backward pass).
Time split over a mesh axis (the `sharding` argument names it; the mesh's `context` axis): each
device runs the chosen implementation on its own segment, and context_parallel.py hands the states
across segments with one all-gather.
"chunked" and "pallas" share one custom VJP (residuals: a, keep and the states): the adjoint is
the reverse recurrence G_k = g_k + conj(a_{k+1} keep_{k+1}) G_{k+1} (see each implementation).

Planar: a complex (..., P) array is held as a real (..., 2, P) array, [real parts; imaginary
parts] (planar_complex.py).
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from s5scale.choices import SCAN_IMPLS as IMPLS
from s5scale.ssm import chunked_scan
from s5scale.ssm import context_parallel
from s5scale.ssm import mesh_spec
from s5scale.ssm import pallas_scan
from s5scale.ssm.planar_complex import complex_multiply, from_planar, to_planar


def check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"scan_impl must be one of {IMPLS}, got {impl!r}")


def keep_masks(reset, bidirectional: bool):
  """Per-direction `keep` arguments of linear_recurrence_planar from reset flags: 0 where the
  carried state is dropped.

  Forward, reset[k] drops the state carried into k. Backward, the document ends where the next step
  resets, so reset[k+1] drops the state carried from k+1 into k.

  Args:
    reset: (..., L) bool or None.
  Returns:
    [forward keep] or [forward keep, backward keep], each (..., L) float32 or None.
  """
  if reset is None:
    return [None, None] if bidirectional else [None]
  forward = 1 - reset.astype(jnp.float32)
  return [forward, backward_keep(forward)] if bidirectional else [forward]


def backward_keep(forward_keep):
  """The reverse direction's keep from the forward one: step k keeps what k+1 carries unless
  k+1 starts a document. (..., L) -> (..., L)."""
  return jnp.concatenate([forward_keep[..., 1:], jnp.ones_like(forward_keep[..., :1])], axis=-1)


def check_carried(initial_state, bidirectional: bool) -> None:
  """A carried initial state needs a causal layer: ValueError for a bidirectional one."""
  if initial_state is not None and bidirectional:
    raise ValueError("initial_state (carried state) needs a causal layer: bidirectional=True "
                     "reads the future, which the next window has not seen")


@dataclasses.dataclass(frozen=True)
class _Options:
  impl: str
  num_chunks: int | None       # chunked: C, a divisor of L
  time_tile: int | None        # pallas: steps per grid step
  interpret: Any               # pallas: False, True or pltpu.InterpretParams()
  sharding: PartitionSpec | None  # pallas: (rows, L, 2, P) over the tracing context's mesh


def _forward(options: _Options, multipliers, inputs, keep, reverse: bool):
  def chunked(multipliers, inputs, keep):
    return chunked_scan.chunked_states(multipliers, inputs, keep, reverse, options.num_chunks)

  def pallas(multipliers, inputs, keep):
    return pallas_scan.forward(multipliers, inputs, keep, reverse, time_tile=options.time_tile,
                               interpret=options.interpret, sharding=options.sharding)

  return _pick(options.impl, chunked, pallas)(multipliers, inputs, keep)


def _backward(options: _Options, reverse: bool, residuals, states_cotangent):
  def chunked(residuals, states_cotangent):
    return chunked_scan.chunked_backward(reverse, options.num_chunks, residuals, states_cotangent)

  def pallas(residuals, states_cotangent):
    return pallas_scan.backward(reverse, residuals, states_cotangent,
                                time_tile=options.time_tile, interpret=options.interpret,
                                sharding=options.sharding)

  return _pick(options.impl, chunked, pallas)(residuals, states_cotangent)


def _pick(impl: str, chunked, pallas):
  if impl == "chunked":
    return chunked
  if impl == "pallas":
    return pallas
  if impl == "auto":  # both are traced; lowering keeps only the target platform's branch
    return lambda *args: jax.lax.platform_dependent(*args, tpu=pallas, default=chunked)
  raise ValueError(f"no recurrence kernel for impl {impl!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _recurrence(multipliers, inputs, keep, reverse, options):
  return _forward(options, multipliers, inputs, keep, reverse)


def _recurrence_forward(multipliers, inputs, keep, reverse, options):
  states = _forward(options, multipliers, inputs, keep, reverse)
  return states, (multipliers, keep, states)


def _recurrence_backward(reverse, options, residuals, states_cotangent):
  return _backward(options, reverse, residuals, states_cotangent)


_recurrence.defvjp(_recurrence_forward, _recurrence_backward)


def _associative_scan(multipliers, inputs, keep, reverse: bool):
  """The reference: complex (a, b) pairs combined by jax.lax.associative_scan, plain autodiff."""
  a = jnp.broadcast_to(from_planar(multipliers), inputs.shape[:-2] + inputs.shape[-1:])
  if keep is not None:
    a = a * keep[..., None]

  def combine(earlier, later):
    return later[0] * earlier[0], later[0] * earlier[1] + later[1]

  _, states = jax.lax.associative_scan(combine, (a, from_planar(inputs)),
                                       reverse=reverse, axis=1)
  return to_planar(states)


def fold_initial_state(multipliers, inputs, keep, initial_state):
  """b with the state h entering step 0 folded into it: b_0 + a_0 keep_0 h.

  Then the recurrence from a zero state gives every state of the one entering from h, for every
  implementation and the context-parallel path alike; a reset at step 0 drops h, and autodiff
  carries gradients to h and a_0 through this one product.

  Args:
    multipliers: (2, P) or (..., L, 2, P) planar a.
    inputs: (..., L, 2, P) planar b.
    keep: (..., L) real or None.
    initial_state: (..., 2, P) planar h, inputs' leading dims.
  Returns:
    (..., L, 2, P) planar, inputs' dtype.
  """
  first_multiplier = multipliers if multipliers.ndim == 2 else multipliers[..., 0, :, :]
  entering = complex_multiply(first_multiplier, initial_state.astype(inputs.dtype))
  if keep is not None:
    entering = entering * keep[..., 0, None, None]
  # An in-place update of one step: no pass over the other L − 1.
  return inputs.at[..., 0, :, :].add(entering.astype(inputs.dtype))


def _check_operands(multipliers, inputs, impl: str, num_chunks, time_tile) -> None:
  check_impl(impl)
  if inputs.ndim < 3 or inputs.shape[-2] != 2:
    raise ValueError(f"inputs must be planar (..., L, 2, P), got shape {inputs.shape}")
  if multipliers.shape[-2:] != inputs.shape[-2:]:
    raise ValueError(f"multipliers' trailing (2, P) {multipliers.shape[-2:]} != inputs' "
                     f"{inputs.shape[-2:]}")
  length = inputs.shape[-3]
  if num_chunks is not None and (num_chunks < 1 or length % num_chunks):
    raise ValueError(f"num_chunks must be a positive divisor of L={length}, got {num_chunks}")
  if time_tile is not None and time_tile < 1:
    raise ValueError(f"time_tile must be positive, got {time_tile}")


def _as_rows(multipliers, inputs, keep):
  """Leading dims flattened to rows: multipliers (2, P) or (M, L, 2, P), inputs (M, L, 2, P) and
  keep (M, L), all in inputs' dtype."""
  flat = (-1,) + inputs.shape[-3:]
  if multipliers.ndim > 2:
    multipliers = jnp.broadcast_to(multipliers, inputs.shape).reshape(flat)
  if keep is not None:
    keep = jnp.broadcast_to(keep, inputs.shape[:-2]).reshape(flat[:2]).astype(inputs.dtype)
  return multipliers.astype(inputs.dtype), inputs.reshape(flat), keep


def linear_recurrence_planar(multipliers, inputs, keep=None, reverse: bool = False, *,
                             impl: str = "auto", num_chunks: int | None = None,
                             time_tile: int | None = None, interpret=False,
                             sharding: PartitionSpec | None = None, initial_state=None):
  """States of x_k = a_k keep_k x_{k-1} + b_k (x_{k+1} when reverse), x_{-1} = initial_state
  (zero when None) and x_L = 0 when reverse.

  Args:
    multipliers: (2, P) planar a, or (..., L, 2, P) when it varies along time.
    inputs: (..., L, 2, P) planar b, real float32 (float64 for chunked, reference, interpret).
    keep: (..., L) real, 0 where the carried state is dropped (a reset), 1 elsewhere; or None.
    reverse: run from the last step to the first.
    impl: one of IMPLS (module docstring).
    num_chunks: chunked only: C, a divisor of L; None picks chunked_scan.num_chunks_for(L).
    time_tile: pallas only: steps per grid step; None picks pallas_scan.time_tile_for.
    interpret: pallas only: run the kernel in Pallas' interpreter (CPU tests).
    sharding: PartitionSpec of the (rows, L, 2, P) operands (leading dims flattened to rows) over
      the mesh of the tracing context. Pallas: each device scans its own rows and P. Any impl:
      when it splits time over a mesh axis of more than one device, the context-parallel scan
      runs (context_parallel.py: each device its segment, one all-gather of end states); an
      axis of size 1 changes nothing.
    initial_state: (..., 2, P) planar state entering step 0 (inputs' leading dims), forward only;
      None: zero. Carried state: a window continues where the previous one ended.
  Returns:
    (..., L, 2, P) planar states, inputs' dtype.
  """
  _check_operands(multipliers, inputs, impl, num_chunks, time_tile)
  if initial_state is not None and reverse:
    raise ValueError("initial_state enters step 0 of a forward recurrence; reverse=True has none")
  if initial_state is not None:
    if initial_state.shape != inputs.shape[:-3] + inputs.shape[-2:]:
      raise ValueError(f"initial_state must be (..., 2, P) = {inputs.shape[:-3] + inputs.shape[-2:]}"
                       f", got {initial_state.shape}")
    inputs = fold_initial_state(multipliers, inputs, keep, initial_state)
  multipliers, rows, keep = _as_rows(multipliers, inputs, keep)
  time_axis = mesh_spec.time_axis(sharding)
  # Under context parallelism the local scan already runs per device: no sharding of its own.
  options = _Options(impl, num_chunks, time_tile, interpret,
                     sharding if time_axis is None else None)

  def local_scan(multipliers, rows, keep):
    if impl == "reference":
      return _associative_scan(multipliers, rows, keep, reverse)
    return _recurrence(multipliers, rows, keep, reverse, options)

  if time_axis is None:
    states = local_scan(multipliers, rows, keep)
  else:
    states = context_parallel.context_parallel_states(local_scan, multipliers, rows, keep, reverse,
                                                      axis=time_axis, spec=sharding)
  return states.reshape(inputs.shape)



def bidirectional_recurrence_planar(multipliers, inputs, keep=None, *, impl: str = "auto",
                                    num_chunks: int | None = None, time_tile: int | None = None,
                                    interpret=False, sharding: PartitionSpec | None = None):
  """Both directions of a bidirectional layer over the same a and b: linear_recurrence_planar
  forward and reverse, with keep_masks(reset, True)'s two keeps built from the forward `keep`.
  Under context parallelism the two directions share ONE all-gather over the time axis, and the
  reverse keep is derived on each device (context_parallel.context_parallel_directions): no
  other collective.

  Args:
    multipliers, inputs, impl, num_chunks, time_tile, interpret, sharding: as
      linear_recurrence_planar.
    keep: (..., L) real forward keep (1 - reset), or None.
  Returns:
    (forward states, backward states), each (..., L, 2, P) planar, inputs' dtype.
  """
  time_axis = mesh_spec.time_axis(sharding)
  if time_axis is None:
    keeps = [None, None] if keep is None else [keep, backward_keep(keep)]
    return tuple(linear_recurrence_planar(multipliers, inputs, keep, reverse, impl=impl,
                                          num_chunks=num_chunks, time_tile=time_tile,
                                          interpret=interpret, sharding=sharding)
                 for reverse, keep in zip((False, True), keeps))
  _check_operands(multipliers, inputs, impl, num_chunks, time_tile)
  multipliers, rows, keep = _as_rows(multipliers, inputs, keep)
  # The local scans run per device inside the one shard_map: no sharding of their own.
  options = _Options(impl, num_chunks, time_tile, interpret, None)

  def local_scan(reverse):
    if impl == "reference":
      return lambda a, b, keep: _associative_scan(a, b, keep, reverse)
    return lambda a, b, keep: _recurrence(a, b, keep, reverse, options)

  states = context_parallel.context_parallel_directions(
      [local_scan(False), local_scan(True)], multipliers, rows, [keep],
      [False, True], axis=time_axis, spec=sharding, bidirectional_keep=True)
  return tuple(direction.reshape(inputs.shape) for direction in states)


def linear_recurrence(multipliers, bu, reverse: bool = False, *, impl: str = "auto"):
  """Complex interface: x_k = a_k x_{k∓1} + b_k over axis -2.

  Args:
    multipliers: (P',) or (..., L, P') complex (zero where a reset drops the state).
    bu: (..., L, P') complex.
  Returns:
    (..., L, P') complex states.
  """
  return from_planar(linear_recurrence_planar(
      to_planar(multipliers), to_planar(bu), reverse=reverse, impl=impl))
