"""PartitionSpecs of the planar recurrence's (rows, L, 2, P) operands over the tracing context's
mesh (jax.sharding.get_abstract_mesh(); parallel.logical_constraints sets it), for the functions
that run per device under shard_map: the Pallas kernel (pallas_scan.py) and the context-parallel
recurrence (context_parallel.py).
"""

import jax
from jax.sharding import PartitionSpec

ROWS, TIME, PARTS, STATES = range(4)


def fitted_spec(spec, shape, mesh, whole=(TIME, PARTS)) -> PartitionSpec:
  """spec (rows, time, parts, P) with the dimensions in `whole` unsplit, and any mesh axes that do
  not divide their dimension dropped (those dimensions are then replicated rather than an error).
  """
  spec = tuple(spec) + (None,) * (4 - len(spec))
  fitted = []
  for index, axes in enumerate(spec):
    names = () if axes is None or index in whole else (
        (axes,) if isinstance(axes, str) else tuple(axes))
    ways = 1
    for name in names:
      ways *= mesh.shape[name]
    fitted.append(names if names and shape[index] % ways == 0 else None)
  return PartitionSpec(*fitted)


def time_axis(spec) -> str | None:
  """The mesh axis that spec splits time over, when the tracing context's mesh gives it more than
  one device; None otherwise (no spec, no mesh, or an axis of size 1: time is then whole and the
  recurrence runs as if unsharded, the same program as without the axis)."""
  if spec is None or len(spec) <= TIME or spec[TIME] is None:
    return None
  mesh = jax.sharding.get_abstract_mesh()
  axis = spec[TIME]
  if mesh.empty or not isinstance(axis, str) or mesh.shape.get(axis, 1) == 1:
    return None
  return axis
