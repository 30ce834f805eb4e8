"""The planar linear recurrence as a Pallas TPU kernel, forward and the reverse scan of its VJP.

    x_k = a_k ⊙ x_{k∓1} + b_k       a, b, x planar (M, L, 2, P) real: [real parts; imaginary parts]

Layout. One time step of one row is a (2, P tile) slab; the grid is (rows, P tiles, time tiles). Time tiles
run in order ("arbitrary") and the carried state stays in a VMEM scratch buffer between them, as
in recurrentgemma's Pallas LRU scan; rows and P tiles are independent ("parallel"). Each input
element is read from HBM once and each state written once: the kernel is a single pass over
memory, where the chunked XLA scan (chunked_scan.py) makes two.

Backward: for a real loss, G = dL/dRe x + i dL/dIm x obeys G_k = g_k + conj(a_{k+1}) G_{k+1}
(reverse of the primal direction), so the same kernel runs the other way:
- a constant along time: it carries G_{k+1}, and sums dL/da = Σ G_{k+1} conj(x_k) per row as it
  goes (reading x, which the forward pass saved anyway), so dL/da costs no extra pass;
- a varying along time: it carries conj(a_k) G_k, which needs no shifted copy of a, and
  dL/da_k = G_k conj(x_{k-1}) is one fused XLA elementwise pass afterwards.
Resets (keep masks) are folded into a by the caller (a_k keep_k), so the kernel sees no mask.

Sharding: given the PartitionSpec of its (rows, L, 2, P) operands, each kernel runs under
shard_map over the tracing context's mesh, so rows and P stay sharded (each device scans its own
rows and states) and time stays whole, with no collective inside the scan.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

from s5scale.ssm import chunked_scan
from s5scale.ssm import mesh_spec
from s5scale.ssm.planar_complex import complex_multiply, conjugate

LANES = 128
MAX_STATE_TILE = 1024     # lanes of P per grid step
SUBLANES = 8              # a step's (2, P) slab may pad to 8 sublanes in VMEM: budget for it
TILE_BYTES = 1 << 20      # one buffer of one input per grid step; inputs and output are
                          # double-buffered, so 3 arrays x 2 x 1 MiB stays well inside the
                          # 16 MiB default scoped VMEM of a v5e
MIN_TILE, MAX_TILE = 8, 1024
UNROLL = 8                # steps per loop iteration: lets the scheduler overlap loads and stores


# ----------------------------------------------------------------------------- tiling

def state_tile_for(num_states: int) -> int:
  """Lanes of P per grid step: all of P up to MAX_STATE_TILE, else the largest multiple of 128
  dividing P within it (Mosaic needs a block's last dimension to be whole or a multiple of 128)."""
  if num_states <= MAX_STATE_TILE or num_states % LANES:
    return num_states
  return max(t for t in range(LANES, MAX_STATE_TILE + 1, LANES) if num_states % t == 0)


def time_tile_for(length: int, num_states: int, itemsize: int = 4) -> int:
  """Steps per grid step: as many as fit TILE_BYTES, preferring a divisor of L (no padding).

  Args:
    length: L.
    num_states: P, the planar width (before sharding: pass the per-device P).
  """
  step_bytes = SUBLANES * state_tile_for(num_states) * itemsize
  largest = max(MIN_TILE, min(MAX_TILE, TILE_BYTES // step_bytes, length))
  for tile in range(largest, max(MIN_TILE, largest // 2) - 1, -1):
    if length % tile == 0:
      return tile
  return largest  # no divisor near: pad L up to a multiple


def _padded_length(length: int, tile: int) -> int:
  return -(-length // tile) * tile


# ----------------------------------------------------------------------------- kernel

def _complex_multiply(a_re, a_im, x_re, x_im):
  return a_re * x_re - a_im * x_im, a_re * x_im + a_im * x_re


# One part of a planar slab as a (1, P tile) row: kept 2-D so Mosaic reads a sublane of the tile.
_REAL, _IMAG = pl.ds(0, 1), pl.ds(1, 1)


def _scan_kernel(*refs, mode: str, varying: bool, reverse: bool, tile: int):
  """One (row, P tile, time tile) grid step.

  mode:
    "primal":      out_k = b_k + a_k ⊙ carry;          carry = out_k
    "adjoint":     out_k = g_k + carry;                carry = conj(a_k) ⊙ out_k   (a varying)
    "correlate":   out_k = g_k + conj(a) ⊙ carry;      Σ carry ⊙ conj(x_k);  carry = out_k
  Refs: a, b (or g), [x for "correlate"], out, [correlation out], carry scratch (2, P tile).
  """
  if mode == "correlate":
    a_ref, b_ref, x_ref, out_ref, correlation_ref, carry_ref = refs
  else:
    a_ref, b_ref, out_ref, carry_ref = refs
  time_step = pl.program_id(2)

  @pl.when(time_step == 0)
  def _():
    carry_ref[...] = jnp.zeros_like(carry_ref)
    if mode == "correlate":
      correlation_ref[...] = jnp.zeros_like(correlation_ref)

  conjugate = -1.0 if mode != "primal" else 1.0
  if not varying:
    a_re, a_im = a_ref[_REAL], conjugate * a_ref[_IMAG]

  def step(i, carry):
    k = tile - 1 - i if reverse else i
    state_re, state_im = carry[0], carry[1]
    if varying:
      step_a_re, step_a_im = a_ref[0, k, _REAL], conjugate * a_ref[0, k, _IMAG]
    else:
      step_a_re, step_a_im = a_re, a_im
    if mode == "adjoint":
      out_re, out_im = b_ref[0, k, _REAL] + state_re, b_ref[0, k, _IMAG] + state_im
      new_re, new_im = _complex_multiply(step_a_re, step_a_im, out_re, out_im)
    else:
      moved_re, moved_im = _complex_multiply(step_a_re, step_a_im, state_re, state_im)
      out_re, out_im = b_ref[0, k, _REAL] + moved_re, b_ref[0, k, _IMAG] + moved_im
      new_re, new_im = out_re, out_im
    out_ref[0, k, _REAL] = out_re
    out_ref[0, k, _IMAG] = out_im
    result = (new_re, new_im)
    if mode == "correlate":
      # carry ⊙ conj(x_k): the term G_{k+1} conj(x_k) of dL/da.
      x_re, x_im = x_ref[0, k, _REAL], x_ref[0, k, _IMAG]
      result += (carry[2] + state_re * x_re + state_im * x_im,
                 carry[3] + state_im * x_re - state_re * x_im)
    return result

  init = (carry_ref[_REAL], carry_ref[_IMAG])
  if mode == "correlate":
    init += (jnp.zeros_like(init[0]), jnp.zeros_like(init[1]))
  final = jax.lax.fori_loop(0, tile, step, init, unroll=min(UNROLL, tile))
  carry_ref[_REAL] = final[0]
  carry_ref[_IMAG] = final[1]
  if mode == "correlate":
    correlation_ref[0, _REAL] += final[2]
    correlation_ref[0, _IMAG] += final[3]


def _pallas_scan_arrays(multipliers, inputs, states=None, *, mode: str, reverse: bool, tile: int,
                 interpret):
  """The kernel over local (unsharded) arrays.

  Args:
    multipliers: (2, P) or (M, L, 2, P) float32.
    inputs: (M, L, 2, P) float32, L a multiple of tile.
    states: (M, L, 2, P) for mode "correlate", else None.
  Returns:
    (M, L, 2, P) outputs, and for "correlate" also the per-row correlation (M, 2, P).
  """
  batch, length, _, num_states = inputs.shape
  state_tile = state_tile_for(num_states)
  num_time_tiles = length // tile
  grid = (batch, num_states // state_tile, num_time_tiles)
  varying = multipliers.ndim == 4

  # Blocks keep the arrays' own (…, 2, P) layout: folding P into (P/128, 128) would make XLA
  # copy every operand and result to a new tiling around the kernel, tripling its HBM traffic.
  def time_block(m, p, s):
    return (m, num_time_tiles - 1 - s if reverse else s, 0, p)

  sequence_spec = pl.BlockSpec((1, tile, 2, state_tile), time_block)
  if varying:
    multiplier_spec = sequence_spec
  else:
    multiplier_spec = pl.BlockSpec((2, state_tile), lambda m, p, s: (0, p))
  operands = [multipliers, inputs]
  in_specs = [multiplier_spec, sequence_spec]
  out_shape = [jax.ShapeDtypeStruct(inputs.shape, inputs.dtype)]
  out_specs = [sequence_spec]
  if mode == "correlate":
    operands.append(states)
    in_specs.append(sequence_spec)
    out_shape.append(jax.ShapeDtypeStruct((batch, 2, num_states), inputs.dtype))
    out_specs.append(pl.BlockSpec((1, 2, state_tile), lambda m, p, s: (m, 0, p)))

  # What the kernel really moves between HBM and VMEM: every sequence array once (read: b, a when
  # it varies, x when correlating; written: the output); a constant a's block is fetched again
  # only when its index changes (once in all with one P tile, else once per row and P tile);
  # the correlation block is written once per row and P tile.
  itemsize = inputs.dtype.itemsize
  sequence_bytes = batch * length * 2 * num_states * itemsize
  row_bytes = 2 * num_states * itemsize
  sequence_reads = 1 + (1 if varying else 0) + (1 if mode == "correlate" else 0)
  bytes_accessed = (sequence_reads + 1) * sequence_bytes
  if not varying:
    bytes_accessed += row_bytes * (1 if grid[1] == 1 else batch)
  if mode == "correlate":
    bytes_accessed += row_bytes * batch
  # A complex multiply-add is 8 real flops per state and step; the correlation is another.
  flops = batch * length * num_states * 8 * (2 if mode == "correlate" else 1)
  outputs = pl.pallas_call(
      functools.partial(_scan_kernel, mode=mode, varying=varying, reverse=reverse, tile=tile),
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((2, state_tile), inputs.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      # The output takes b's (or g's) buffer, as the chunked scan writes its states over its
      # inputs: nothing else reads b after the forward pass (or g after the adjoint).
      input_output_aliases={1: 0},
      cost_estimate=pl.CostEstimate(flops=int(flops), transcendentals=0,
                                    bytes_accessed=int(bytes_accessed)),
      interpret=interpret,
  )(*operands)
  return outputs[0] if mode != "correlate" else tuple(outputs)


# ----------------------------------------------------------------------------- sharding

def _on_mesh(function, mode: str, varying: bool, sharding, shape):
  """function as a shard_map over the tracing context's mesh (parallel.logical_constraints sets
  it): each device runs the kernel on its own rows and states, and time stays whole. XLA cannot
  partition a Mosaic call itself, and custom_partitioning is not wired through on TPU (jax issue
  38196: "Custom emitter for CustomSPMDPartitioning not found"), hence shard_map."""
  mesh = jax.sharding.get_abstract_mesh()
  if sharding is None or mesh.empty:
    return function
  spec = mesh_spec.fitted_spec(sharding, shape, mesh)
  if all(axes is None for axes in spec):
    return function
  multiplier = spec if varying else PartitionSpec(None, spec[3])
  in_specs = (multiplier, spec) + ((spec,) if mode == "correlate" else ())
  out_specs = (spec, PartitionSpec(spec[0], None, spec[3])) if mode == "correlate" else spec
  return jax.shard_map(function, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)


def _padded_scan(multipliers, inputs, states=None, *, mode, reverse, time_tile, interpret):
  """The kernel on one device's arrays, with L padded to a multiple of the time tile: zeros,
  so a padded step neither adds to nor carries a state into the sequence, in either direction.
  The tile is chosen from the per-device P."""
  length = inputs.shape[1]
  tile = time_tile or time_tile_for(length, inputs.shape[-1], inputs.dtype.itemsize)
  padded = _padded_length(length, tile)

  def pad(array):
    if array is None or array.ndim < 4 or padded == length:
      return array
    return jnp.pad(array, ((0, 0), (0, padded - length), (0, 0), (0, 0)))

  outputs = _pallas_scan_arrays(pad(multipliers), pad(inputs), pad(states), mode=mode,
                                reverse=reverse, tile=tile, interpret=interpret)
  if mode == "correlate":
    return outputs[0][:, :length], outputs[1]
  return outputs[:, :length]


def _run(mode, multipliers, inputs, states, reverse, time_tile, interpret, sharding):
  kernel = functools.partial(_padded_scan, mode=mode, reverse=reverse, time_tile=time_tile,
                             interpret=interpret)
  arrays = (multipliers, inputs) + ((states,) if states is not None else ())
  return _on_mesh(kernel, mode, multipliers.ndim == 4, sharding, inputs.shape)(*arrays)


# ----------------------------------------------------------------------------- forward / backward

def _effective_multipliers(multipliers, keep, shape):
  """a_k keep_k: (2, P) unchanged without resets, else (M, L, 2, P)."""
  if keep is None:
    return multipliers
  return jnp.broadcast_to(multipliers, shape) * keep[..., None, None]


def forward(multipliers, inputs, keep, reverse: bool, *, time_tile: int | None = None,
            interpret=False, sharding: PartitionSpec | None = None):
  """States x (M, L, 2, P) of x_k = a_k keep_k x_{k∓1} + b_k.

  Args:
    multipliers: (2, P) or (M, L, 2, P) float32 planar a.
    inputs: (M, L, 2, P) float32 planar b.
    keep: (M, L) float32, 0 where the carried state is dropped, or None.
    time_tile: steps per grid step; None: time_tile_for(L, P).
    interpret: False on TPU; True or pltpu.InterpretParams() to run the kernel on CPU.
    sharding: PartitionSpec of (rows, L, 2, P) over the tracing context's mesh, or None.
  """
  return _run("primal", _effective_multipliers(multipliers, keep, inputs.shape), inputs, None,
              reverse, time_tile, interpret, sharding)


def backward(reverse: bool, residuals, states_cotangent, *, time_tile: int | None = None,
             interpret=False, sharding: PartitionSpec | None = None):
  """(dL/da, dL/db, dL/dkeep = 0) from residuals (multipliers, keep, states) and dL/dx."""
  multipliers, keep, states = residuals
  effective = _effective_multipliers(multipliers, keep, states.shape)
  if effective.ndim == 2:
    adjoint, correlation = _run("correlate", effective, states_cotangent, states, not reverse,
                                time_tile, interpret, sharding)
    multipliers_cotangent = jnp.sum(correlation, axis=0)
  else:
    adjoint = _run("adjoint", effective, states_cotangent, None, not reverse, time_tile,
                   interpret, sharding)
    # dL/da_k = G_k conj(x_{k-1}) (x_{k+1} when reverse): one fused elementwise pass.
    previous = chunked_scan.shift_toward_start(states, not reverse)
    effective_cotangent = complex_multiply(conjugate(previous), adjoint)
    if keep is not None:
      effective_cotangent = effective_cotangent * keep[..., None, None]
    multipliers_cotangent = (effective_cotangent if multipliers.ndim == 4
                             else jnp.sum(effective_cotangent, axis=(0, 1)))
  keep_cotangent = None if keep is None else jnp.zeros_like(keep)
  return multipliers_cotangent, adjoint, keep_cotangent
