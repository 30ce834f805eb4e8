"""Context parallelism: the linear recurrence x_k = a_k keep_k x_{k∓1} + b_k, exactly, with time
split over a mesh axis into S segments, one per device.

1. Each device scans its segment from a zero state with the local implementation (the one
   recurrence.py picked, with its own VJP): states z_t.
2. Its decays w_t: the product of a_k keep_k from the segment's first step through t (from its
   last step back to t when reverse). At the segment's end, w is its transfer: Λ̄^T for a
   constant Λ̄, the product of the per-step factors with intervals, 0 across a reset.
3. ONE all-gather over the axis brings every segment's (end state, transfer) pair: 2 × rows × 2P
   numbers per direction, whatever L. A bidirectional layer's two directions stack their pairs
   into that one gather (context_parallel_directions).
4. A chain over those S pairs (chunked_scan.chain_starts: S steps, done redundantly on every
   device) gives the state h entering each segment, and x_t = z_t + w_t ⊙ h.
Nothing crosses devices inside the time loop. The backward pass is autodiff's mirror image: the
gather's transpose is one reduce-scatter, and the local scans run their own VJPs.

A length that is not a multiple of S is padded at the end with zero inputs: a padded step neither
adds to nor carries a state into the real steps, in either direction.

Planar: a complex (..., P) array is held as a real (..., 2, P) array (planar_complex.py).
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from s5scale.ssm import chunked_scan
from s5scale.ssm import mesh_spec
from s5scale.ssm.planar_complex import complex_multiply


def segment_decays(multipliers, keep, length: int, reverse: bool):
  """w_t = Π a_k keep_k over k from the segment's start through t (from its end when reverse).

  Args:
    multipliers: (2, P) or (M, T, 2, P) planar a.
    keep: (M, T) real or None.
    length: T.
  Returns:
    (M, T, 2, P) planar, or (1, T, 2, P) when a is constant and there is no keep.
  """
  if multipliers.ndim == 2:
    multipliers = jnp.broadcast_to(multipliers, (1, length) + multipliers.shape)
  decays = lax.associative_scan(complex_multiply, multipliers, reverse=reverse, axis=1)
  if keep is not None:
    # keep comes from reset flags: no gradient flows to it (the local scans' VJPs agree).
    kept = lax.cumprod(lax.stop_gradient(keep), axis=1, reverse=reverse)
    decays = decays * kept[..., None, None]
  return decays


def _backward_keep(keep):
  """A segment's backward keep from its forward keep: step k keeps what k+1 carries back unless
  k+1 resets (recurrence.keep_masks). The last step's flag is the next segment's first, which
  this segment does not hold: it is 1 here, and the next segment applies its own first flag to
  the state it hands back (_with_entering_states)."""
  return jnp.concatenate([keep[:, 1:], jnp.ones_like(keep[:, :1])], axis=1)


def _with_entering_states(local_scans, reverses, axis: str, bidirectional_keep: bool):
  """The per-device body: each direction's local scan, ONE gather of every direction's pair, each
  direction's chain and correction. bidirectional_keep: the one keep operand is the forward
  direction's, and the reverse direction's is derived from it on the device."""
  def segment(multipliers, inputs, *keeps):
    handoff = [None] * len(reverses)   # (M,) factors on the pair a segment hands on, or None
    if bidirectional_keep and keeps:
      keeps = (keeps[0], _backward_keep(keeps[0]))
      handoff[1] = lax.stop_gradient(keeps[0][:, 0])   # 0: this segment starts a document
    keeps = keeps or (None,) * len(reverses)
    last_steps, pairs = [], []
    for local_scan, reverse, keep, factor in zip(local_scans, reverses, keeps, handoff):
      states = local_scan(multipliers, inputs, keep)
      decays = segment_decays(multipliers, keep, inputs.shape[1], reverse)
      end = states[:, 0 if reverse else -1]
      last_steps.append((states, decays))
      pair = jnp.stack([end, jnp.broadcast_to(decays[:, 0 if reverse else -1], end.shape)])
      pairs.append(pair if factor is None else pair * factor[:, None, None])   # (2, M, 2, P)
    gathered = lax.all_gather(jnp.stack(pairs), axis, axis=2)          # (D, 2, S, M, 2, P)
    index = lax.axis_index(axis)
    corrected = []
    for (states, decays), reverse, (ends, transfers) in zip(last_steps, reverses, gathered):
      entering = chunked_scan.chain_starts(transfers, ends, reverse)[index]
      corrected.append(states + complex_multiply(decays, entering[:, None]))
    return tuple(corrected)

  return segment


def context_parallel_directions(local_scans, multipliers, inputs, keeps, reverses, *, axis: str,
                                spec: PartitionSpec, bidirectional_keep: bool = False):
  """States of the recurrence in each of several directions over the same a and b (a
  bidirectional layer's forward and reverse scans), time split over mesh axis `axis`; all
  directions share one all-gather of (D, 2, rows, 2, P) numbers.

  Args:
    local_scans: D functions (multipliers, inputs, keep) -> states, as in context_parallel_states.
    multipliers: (2, P) or (M, L, 2, P) planar a.
    inputs: (M, L, 2, P) planar b.
    keeps: D arrays (M, L), one per direction, or D Nones; with bidirectional_keep, [forward
      keep] or [None] for the directions (forward, reverse).
    reverses: D bools.
    axis, spec: as in context_parallel_states.
    bidirectional_keep: derive the reverse keep from the forward one on each device (as
      recurrence.keep_masks does), so that no flag crosses a segment boundary on its own.
  Returns:
    D arrays (M, L, 2, P) planar states, one per direction.
  """
  if len({keep is None for keep in keeps}) > 1:
    raise ValueError("every direction needs a keep mask, or none does")
  if bidirectional_keep and (list(reverses) != [False, True] or len(keeps) != 1):
    raise ValueError("bidirectional_keep takes directions [False, True] and one (forward) keep")
  mesh = jax.sharding.get_abstract_mesh()
  length = inputs.shape[1]
  padding = -length % mesh.shape[axis]

  def padded(array):  # time is axis 1 of every per-step operand
    return jnp.pad(array, [(0, 0), (0, padding)] + [(0, 0)] * (array.ndim - 2))

  varying = multipliers.ndim > 2
  keeps = [padded(keep) for keep in keeps if keep is not None]
  operands = [padded(multipliers) if varying else multipliers, padded(inputs), *keeps]
  spec = mesh_spec.fitted_spec(spec, operands[1].shape, mesh, whole=(mesh_spec.PARTS,))
  spec = PartitionSpec(spec[0], axis, None, spec[3])
  in_specs = [spec if varying else PartitionSpec(None, spec[3]), spec]
  in_specs += [PartitionSpec(spec[0], axis)] * len(keeps)
  body = _with_entering_states(tuple(local_scans), tuple(reverses), axis, bidirectional_keep)
  states = jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs),
                         out_specs=(spec,) * len(reverses), check_vma=False)(*operands)
  return [direction[:, :length] for direction in states]


def context_parallel_states(local_scan, multipliers, inputs, keep, reverse: bool, *, axis: str,
                            spec: PartitionSpec):
  """States of the recurrence with time split over mesh axis `axis` of the tracing context's mesh.

  Args:
    local_scan: (multipliers, inputs, keep) -> states, on one device's arrays, from a zero state.
    multipliers: (2, P) or (M, L, 2, P) planar a.
    inputs: (M, L, 2, P) planar b.
    keep: (M, L) real, 0 where the carried state is dropped, or None.
    axis: the mesh axis that splits time (mesh_spec.time_axis).
    spec: PartitionSpec of the (M, L, 2, P) operands; its rows and P axes stay split where they
      divide their dimension, time is split over `axis`.
  Returns:
    (M, L, 2, P) planar states.
  """
  return context_parallel_directions([local_scan], multipliers, inputs, [keep], [reverse],
                                     axis=axis, spec=spec)[0]
