"""Which devices each collective of a compiled HLO module runs over.

A collective's replica_groups attribute names the participants by global device id (with one
replica, the partition id: the position in the program's device assignment, which for jit is the
mesh's devices in row-major order). XLA prints it in three spellings, all expanded here:

  {{0,1},{2,3}}                              explicit groups
  [2,2]<=[4]   [2,2]<=[2,2]T(1,0)            iota: arange(prod(dims)).reshape(dims).transpose(T)
                                             .reshape(groups, size)
  mesh['a'=2,'b'=2] {'b'}                    named mesh: devices that differ only along the named
  mesh['a'=2,'b'=2], device_ids=([2,2]T(1,0)) {'b'}   axes form a group; device_ids (an iota
                                             spec or an explicit list) maps mesh positions to ids

A collective-permute has source_target_pairs={{0,1},{1,0}} instead.
"""

import math
import re

import numpy as np

_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]"
                   r"(?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}")
_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_EXPLICIT = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


def _ints(text: str) -> list[int]:
  return [int(n) for n in text.split(",") if n.strip()]


def _iota(dims: list[int], reshape: list[int], transpose: list[int] | None) -> np.ndarray:
  """XLA's iota tile assignment: arange over `reshape`, transposed, viewed as `dims`."""
  ids = np.arange(math.prod(reshape)).reshape(reshape)
  if transpose:
    ids = ids.transpose(transpose)
  return ids.reshape(dims)


def _device_ids(spec: str | None, count: int) -> np.ndarray:
  """Device id at each mesh position (row-major), from a device_ids=(...) spec or the identity."""
  if not spec:
    return np.arange(count)
  iota = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", spec.strip())
  if iota:
    reshape = _ints(iota.group(1))
    return _iota([count], reshape, _ints(iota.group(2)) if iota.group(2) else None)
  return np.asarray(_ints(spec))


def expand(attributes: str, num_devices: int | None = None) -> list[list[int]] | None:
  """The replica groups of a collective (lists of device ids), or None if it names none.

  An empty {} means one group of all `num_devices` devices (None if that is not given).
  """
  named = _MESH.search(attributes)
  if named:
    axes = re.findall(r"'(\w+)'=(\d+)", named.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    ids = _device_ids(named.group(2), math.prod(sizes)).reshape(sizes)
    grouped = [names.index(a) for a in re.findall(r"'(\w+)'", named.group(3))]
    others = [i for i in range(len(names)) if i not in grouped]
    size = math.prod(sizes[i] for i in grouped)
    return ids.transpose(others + grouped).reshape(-1, size).tolist()
  iota = _IOTA.search(attributes)
  if iota:
    transpose = _ints(iota.group(3)) if iota.group(3) else None
    return _iota(_ints(iota.group(1)), _ints(iota.group(2)), transpose).tolist()
  explicit = _EXPLICIT.search(attributes)
  if explicit:
    groups = [_ints(g) for g in re.findall(r"\{([\d,]*)\}", explicit.group(1))]
    groups = [g for g in groups if g]
    if groups:
      return groups
    return [list(range(num_devices))] if num_devices else None
  return None


def source_target_pairs(attributes: str) -> list[tuple[int, int]]:
  """(source, target) device ids of a collective-permute; [] if the attribute is absent."""
  pairs = _PAIRS.search(attributes)
  if not pairs:
    return []
  return [(int(s), int(t)) for s, t in re.findall(r"\{(\d+),(\d+)\}", pairs.group(1))]
