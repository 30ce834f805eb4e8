"""Step time bounds of a compiled program from its HLO totals (s5scale/hlo_stats.py) and the chip
(s5scale/hardware.py): what aot_compile.py reports for a TPU slice and bench.py calibrate checks
on this machine's CPU.

Terms, each in seconds per step on one chip:
  compute_s     matmul FLOPs / peak FLOP/s
  memory_s      HBM bytes / HBM bandwidth (arrays in VMEM are not HBM traffic)
  collective_s  ICI + DCN time of every collective, priced on the links it runs over (below)
  host_s        bytes to and from host memory (model.remat="offload") / the PCIe bandwidth
Two bounds: overlapped_s = max of the four (everything overlaps perfectly: a lower bound on the
step) and serial_s = their sum (nothing overlaps, every collective and host transfer exposed).
MFU at each is 6 * matmul parameters * tokens per chip / (bound * peak).

Collectives. Each collective's replica groups are device ids, placed on the physical torus by
the devices' coordinates (Torus). Within one slice a group spans some torus axes; along each
spanned axis it has n chips at a spacing d (d > 1 when other groups interleave with it and share
its links). That axis carries, per chip, 2 * link / d when the group closes a ring over a
wraparound (n * d == the axis length, and the axis wraps: hardware.torus_wraps), else link / d
(a line: each link used in one direction, the scaling book's "no wraparound ... typically doubles
the time"). A group spanning several axes uses all their links at once, so its bandwidth W is
the sum over the axes (scaling book, part 3: gathering over multiple axes "increases the
available bandwidth by a factor of N_axes"). With X the gathered (or unscattered) array and k
chips per group in the slice, each chip sends:
  all-gather, reduce-scatter   X * (k-1)/k           (ring; bidirectional when W counts 2 links)
  all-reduce                   2 * X * (k-1)/k       (reduce-scatter then all-gather)
  all-to-all                   k * b / 4, b = each chip's buffer (scaling book: "on a TPU ...
                               the cost is B / (4W)" for an array of B = k * b bytes)
and takes that / W. A collective-permute sends its buffer to one peer: buffer * hops / link
(a shift by `hops` makes every link on the way carry that many buffers).

Across slices (DCN): a multislice program is compiled for one slice, and what crosses slices
is a host-transfer send that the megascale runtime carries over DCN (hlo_stats.dcn_transfers):
each chip's buffer b among s slices, b * (s-1)/s (twice for an all-reduce) at the chip's DCN
bandwidth. Should a replica group itself span slices, it is done hierarchically: in-slice on ICI as
above with k/s chips, and across slices on the reduced shard X * s/k: each chip sends
(X * s/k) * (s-1)/s (twice for an all-reduce) at the chip's DCN bandwidth. A permute whose pair
crosses slices sends its buffer over DCN.
"""

import dataclasses
import functools

import jax

from s5scale import hardware


@dataclasses.dataclass(frozen=True)
class Torus:
  """Where each device of a program sits. Indexed by device id (the position in the program's
  device assignment, which is what replica groups name)."""
  coords: tuple[tuple[int, ...], ...]  # chip coordinates within its slice
  slices: tuple[int, ...]              # slice index of each device
  shape: tuple[int, ...]               # chips along each axis of one slice
  wraps: tuple[bool, ...]              # wraparound link on each axis


def torus_of(devices, chip: hardware.Chip) -> Torus:
  """The Torus of `devices` in program order (e.g. a Mesh's devices.flat)."""
  coords = tuple(tuple(getattr(d, "coords", (0,))) for d in devices)
  slices = tuple(getattr(d, "slice_index", 0) or 0 for d in devices)
  in_first = [c for c, s in zip(coords, slices) if s == slices[0]]
  shape = tuple(max(c[axis] for c in in_first) + 1 for axis in range(len(coords[0])))
  return Torus(coords, slices, shape, hardware.torus_wraps(chip, shape))


def _axis_bandwidth(positions: list[int], axis: int, torus: Torus, link: float) -> float:
  """Bytes/s per chip along one torus axis for a group at these (distinct, sorted) positions.

  The group's chips lie on the shortest stretch of the axis that holds them all (on a wrapped
  axis it may run through the wraparound: 15 and 0 are neighbours); spread evenly over it, they
  are `spacing` links apart.
  """
  gaps = [b - a for a, b in zip(positions, positions[1:])]
  if torus.wraps[axis]:
    gaps.append(torus.shape[axis] - positions[-1] + positions[0])
    span = torus.shape[axis] - max(gaps)
  else:
    span = positions[-1] - positions[0]
  spacing = span / (len(positions) - 1)
  ring = torus.wraps[axis] and len(set(gaps)) == 1  # evenly around the whole axis
  return (2 if ring else 1) * link / spacing


def _group_bandwidth(group: tuple[int, ...], torus: Torus, link: float) -> tuple[float, int, int]:
  """(ICI bytes/s per chip, chips per slice, slices) of one replica group."""
  first_slice = torus.slices[group[0]]
  members = [torus.coords[d] for d in group if torus.slices[d] == first_slice]
  num_slices = len({torus.slices[d] for d in group})
  bandwidth = 0.0
  for axis in range(len(torus.shape)):
    positions = sorted({c[axis] for c in members})
    if len(positions) > 1:
      bandwidth += _axis_bandwidth(positions, axis, torus, link)
  return bandwidth, len(members), num_slices


def _ici_bytes(kind: str, moved: float, chips: int) -> float:
  """Bytes each chip sends over ICI in a group of `chips` (module docstring)."""
  if chips <= 1:
    return 0.0
  share = moved * (chips - 1) / chips
  if kind == "all-reduce":
    return 2 * share
  if kind == "all-to-all":
    return chips * moved / 4
  return share


def _hops(a: tuple[int, ...], b: tuple[int, ...], torus: Torus) -> int:
  """Links between two chips of a slice: per axis the shorter way round when the axis wraps."""
  total = 0
  for axis, (x, y) in enumerate(zip(a, b)):
    distance = abs(x - y)
    if torus.wraps[axis]:
      distance = min(distance, torus.shape[axis] - distance)
    total += distance
  return total


def collective_seconds(call: dict, torus: Torus, chip: hardware.Chip) -> dict:
  """{"ici_s", "dcn_s"} of ONE execution of a collective (a hlo_stats.collective_calls entry
  with kind, bytes and groups, or pairs for a permute)."""
  kind, moved = call["kind"], call["bytes"]
  if kind == "collective-permute":
    ici, dcn = 0.0, 0.0
    for source, target in call.get("pairs") or []:
      if torus.slices[source] != torus.slices[target]:
        dcn = max(dcn, moved / chip.dcn_bandwidth)
      elif source != target:
        ici = max(ici, moved * _hops(torus.coords[source], torus.coords[target], torus)
                  / chip.ici_link_bandwidth)
    return dict(ici_s=ici, dcn_s=dcn)
  groups = call.get("groups") or [list(range(len(torus.coords)))]
  ici, dcn = 0.0, 0.0
  for group in {tuple(g) for g in groups}:
    bandwidth, chips, num_slices = _group_bandwidth(group, torus, chip.ici_link_bandwidth)
    sent = _ici_bytes(kind, moved, chips)
    if sent:
      ici = max(ici, sent / bandwidth)
    if num_slices > 1:
      shard = moved / chips
      factor = 2 if kind == "all-reduce" else 1
      dcn = max(dcn, factor * shard * (num_slices - 1) / num_slices / chip.dcn_bandwidth)
  return dict(ici_s=ici, dcn_s=dcn)


def dcn_seconds(transfer: dict, num_slices: int, chip: hardware.Chip) -> float:
  """Seconds of ONE cross-slice transfer (hlo_stats.dcn_transfers) of each chip's buffer b among
  its peers in `num_slices` slices: b * (s-1)/s (twice for an all-reduce) at the chip's DCN
  bandwidth."""
  factor = 2 if transfer["kind"] == "all-reduce" else 1
  return factor * transfer["bytes"] * (num_slices - 1) / num_slices / chip.dcn_bandwidth


def collectives_seconds(calls: list[dict], torus: Torus, chip: hardware.Chip,
                        transfers: list[dict] = ()) -> dict:
  """Per step: {"ici_s", "dcn_s", "by_kind": {kind: seconds}} over every call (in-program
  collectives, hlo_stats.collective_calls) and cross-slice transfer (hlo_stats.dcn_transfers)
  times its count."""
  total = dict(ici_s=0.0, dcn_s=0.0, by_kind={})
  num_slices = len(set(torus.slices))
  for transfer in transfers:
    seconds = transfer["count"] * dcn_seconds(transfer, max(num_slices, 2), chip)
    total["dcn_s"] += seconds
    key = transfer["kind"] + " (DCN)"
    total["by_kind"][key] = total["by_kind"].get(key, 0.0) + seconds
  priced = functools.lru_cache(maxsize=None)(
      lambda kind, moved, groups, pairs: collective_seconds(
          dict(kind=kind, bytes=moved, groups=groups, pairs=pairs), torus, chip))
  for call in calls:
    groups = tuple(tuple(g) for g in call.get("groups") or ())
    one = priced(call["kind"], call["bytes"], groups, tuple(call.get("pairs") or ()))
    for link in ("ici_s", "dcn_s"):
      total[link] += call["count"] * one[link]
    total["by_kind"][call["kind"]] = total["by_kind"].get(call["kind"], 0.0) + call["count"] * (
        one["ici_s"] + one["dcn_s"])
  return total


def bounds(totals: dict, collective: dict, chip: hardware.Chip, model_flops: float,
           tokens_per_chip: float) -> dict:
  """The roofline terms (seconds), both bounds, and MFU and tokens/s/chip at each.

  totals: hlo_stats.step_totals (matmul_flops, hbm_bytes, host_bytes); collective:
  collectives_seconds. model_flops and tokens_per_chip are per chip per step.
  """
  times = dict(compute_s=totals["matmul_flops"] / chip.peak_flops,
               memory_s=totals["hbm_bytes"] / chip.hbm_bandwidth,
               collective_s=collective["ici_s"] + collective["dcn_s"],
               host_s=totals.get("host_bytes", 0.0) / chip.host_bandwidth)
  overlapped, serial = max(times.values()), sum(times.values())

  def at(step_s):
    return (model_flops / (step_s * chip.peak_flops) if step_s else 0.0,
            tokens_per_chip / step_s if step_s else 0.0)

  mfu, tokens = at(overlapped)
  serial_mfu, serial_tokens = at(serial)
  return dict(times, ici_s=collective["ici_s"], dcn_s=collective["dcn_s"],
              collective_by_kind=collective["by_kind"],
              step_s=overlapped, bound=max(times, key=times.get)[:-2], mfu=mfu,
              tokens_per_s_per_chip=tokens,
              collective_share=times["collective_s"] / overlapped if overlapped else 0.0,
              serial_s=serial, serial_mfu=serial_mfu, serial_tokens_per_s_per_chip=serial_tokens,
              exposed_share=(serial - times["compute_s"]) / serial if serial else 0.0)



def matmul_params(params) -> int:
  """Parameters that each take one multiply-add per token (the N of 6*N*tokens): dense kernels
  and the S5 layer's B̃ and C̃. The embedding table is a gather, and the rest (norms, biases,
  Λ, log Δ, D) are per-element."""
  return sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if getattr(path[-1], "key", "") in ("kernel", "B", "C"))
