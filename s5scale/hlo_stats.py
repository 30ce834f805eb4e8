"""Per-step totals from a compiled (partitioned) HLO module's text, loops counted by trip count.

XLA's own cost analysis counts every while-loop body once. Here the layer stack is an nn.scan and
the S5 recurrence is a loop over chunks, so its FLOPs and bytes are mostly inside loops; these
totals multiply each computation by how often it runs:

  matmul_flops     2·M·N·K of every dot and convolution (the MXU's work)
  hbm_bytes        operands + result of every instruction outside fusions (a fusion keeps its
                   intermediates on chip); a slice reads only the slice and an in-place update
                   writes only the update. That is XLA's own rule (with every loop body counted
                   once, these totals come within ~5% of its "bytes accessed"). Arrays whose
                   layout puts them in another memory space are not HBM traffic:
  vmem_bytes       ... in S(1), TPU's on-chip VMEM (where memory-space assignment prefetches
                   buffers with copy-start/copy-done)
  host_bytes       ... in S(5), the host's memory (model.remat="offload"), moved over PCIe
  collectives      {kind: {"count", "bytes"}}: executions per step and bytes moved, where bytes
                   is the larger of operands and result (an all-gather's result is the gathered
                   array, a reduce-scatter's operand the unscattered one); TPU's fused
                   all-reduce-scatter counts as a reduce-scatter. wire_bytes: what each device
                   sends in a ring over its replica group of n: (n-1)/n of that, twice for
                   an all-reduce
  unknown_loops    loops whose trip count could not be read (counted once)

A trip count is read from the loop condition `counter < constant` (how JAX lowers scan and
fori_loop, counting from 0), or from a known_trip_count in the loop's backend config.
"""

import collections
import math
import re

from s5scale import replica_groups
from s5scale.hlo_text import bytes_by_space, dims, parse_module, shape_bytes, space_of

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

VMEM_SPACE, HOST_SPACE = 1, 5  # TPU memory spaces in a layout's S(n); 0 (no S) is HBM
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')

# Instructions that move no data of their own (aliases, bookkeeping, or control flow whose
# bodies are counted separately); an async pair is counted at its start.
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
               "add-dependency", "async-start", "async-update", "async-done", "copy-done",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "send-done",
               "recv-done", "dynamic-slice-done", "dynamic-update-slice-done"}


def _trip_count(instruction: dict, computations: dict):
  """The loop's trip count, or None when it cannot be read."""
  known = _TRIP_COUNT.search(instruction["attributes"])
  if known:
    return int(known.group(1))
  condition = computations.get(instruction["called"].get("condition"), [])
  constants = {op["name"]: int(op["inner"]) for op in condition
               if op["opcode"] == "constant" and re.fullmatch(r"-?\d+", op["inner"])}
  for op in condition:
    if op["opcode"] == "compare" and "direction=LT" in op["attributes"]:
      if len(op["operands"]) == 2 and op["operands"][1] in constants:
        return constants[op["operands"][1]]
  return None


def _multiplicities(computations: dict, entry: str):
  """How often each control-flow computation runs per call of the entry, and the fused
  computations (whose instructions count for FLOPs only) with theirs."""
  control, fused = collections.Counter(), collections.Counter()
  unknown_loops = 0
  pending = [(entry, 1)]
  while pending:
    name, times = pending.pop()
    control[name] += times
    for op in computations.get(name, []):
      called = op["called"]
      if op["opcode"] == "while":
        trips = _trip_count(op, computations)
        if trips is None:
          unknown_loops += 1
          trips = 1
        pending.append((called["body"], times * trips))
      elif op["opcode"] == "fusion" and "calls" in called:
        _add_fused(computations, called["calls"], times, fused)
      elif op["opcode"] in ("call", "async-start") and "calls" in called:
        pending.append((called["calls"], times))
      elif op["opcode"] == "conditional":
        pending.extend((branch, times) for branch in op["branches"])
  return control, fused, unknown_loops


def _add_fused(computations, name, times, fused):
  fused[name] += times
  for op in computations.get(name, []):
    if op["opcode"] == "fusion" and "calls" in op["called"]:
      _add_fused(computations, op["called"]["calls"], times, fused)


def _matmul_flops(op: dict, types: dict) -> float:
  result = math.prod(dims(op["type"]))
  if op["opcode"] == "dot":
    lhs = dims(types.get(op["operands"][0], ""))
    match = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", op["attributes"])
    contracted = [int(d) for d in match.group(1).split(",") if d] if match else []
    return 2.0 * result * math.prod(lhs[d] for d in contracted if d < len(lhs))
  # convolution: an output element takes one multiply-add per kernel element feeding it, i.e.
  # the kernel's size over its output features (feature groups are already in the kernel shape).
  rhs = dims(types.get(op["operands"][1], "")) if len(op["operands"]) > 1 else []
  labels = re.search(r"dim_labels=\w*_(\w+)->", op["attributes"])
  if not rhs or not labels or "o" not in labels.group(1):
    return 0.0
  return 2.0 * result * math.prod(rhs) / rhs[labels.group(1).index("o")]


def _traffic(op: dict, types: dict, computations: dict) -> collections.Counter:
  """{memory space: bytes} read and written by one top-level instruction.

  Slicing reads only the slice, and an in-place update writes only the update (the rest of the
  buffer is aliased): the stacked layer parameters are sliced this way on every loop iteration,
  and the block inputs that model.remat="offload" keeps in host memory are written and read
  this way by asynchronous slices (counted at their start). Each byte counts in the space it is
  read from or written to: a slice of a host buffer into HBM is a host read and an HBM write.
  """
  operand_types = [types.get(o, "") for o in op["operands"]]
  traffic = collections.Counter()
  if op["opcode"] == "custom-call" and 'custom_call_target="AllocateBuffer"' in op["attributes"]:
    return traffic  # reserves a buffer, moves nothing
  if op["opcode"] == "dynamic-slice":
    traffic[space_of(operand_types[0])] += shape_bytes(op["type"])
    traffic.update(bytes_by_space(op["type"]))
    return traffic
  if op["opcode"] in ("dynamic-update-slice", "dynamic-update-slice-start"):
    update = shape_bytes(operand_types[1])
    traffic[space_of(operand_types[1])] += update
    traffic[space_of(operand_types[0])] += update
    return traffic
  if op["opcode"] in ("dynamic-slice-start", "copy-start"):
    # The type is ((operands) or operand, destination, context): what the operands leave is the
    # destination written (and a few context bytes), as many bytes read from the first operand.
    written = bytes_by_space(op["type"])
    for operand_type in operand_types:
      written.subtract(bytes_by_space(operand_type))
    written = +written
    traffic[space_of(operand_types[0]) if operand_types else 0] += sum(written.values())
    traffic.update(written)
    return traffic
  if op["opcode"] != "fusion" or "calls" not in op["called"]:
    for type_text in operand_types + [op["type"]]:
      traffic.update(bytes_by_space(type_text))
    return traffic
  fused = computations.get(op["called"]["calls"], [])
  by_name = {f["name"]: f for f in fused}
  users = collections.defaultdict(list)
  for f in fused:
    for operand in f["operands"]:
      users[operand].append(f)
  root = fused[-1] if fused else None
  roots = [by_name[n] for n in root["operands"]] if root and root["opcode"] == "tuple" else [root]
  in_place = {r["operands"][0] for r in roots if r and r["opcode"] == "dynamic-update-slice"}
  for f in fused:
    if f["opcode"] != "parameter" or not f["inner"].isdigit() or int(f["inner"]) >= len(
        operand_types):
      continue
    consumers = users[f["name"]]
    outer_type = operand_types[int(f["inner"])]
    if f["name"] in in_place:
      continue  # the buffer being updated in place
    if consumers and all(c["opcode"] == "dynamic-slice" and c["operands"][0] == f["name"]
                         for c in consumers):
      traffic[space_of(outer_type)] += sum(shape_bytes(c["type"]) for c in consumers)
    else:
      traffic.update(bytes_by_space(outer_type))
  outputs = [op["type"]] if len(roots) == 1 else [r["type"] if r else "" for r in roots]
  for r, output_type in zip(roots, outputs):
    if r is None:
      continue
    if r["opcode"] == "dynamic-update-slice":
      update = shape_bytes(by_name.get(r["operands"][1], {}).get("type", ""))
      traffic[space_of(output_type)] += update
    else:
      traffic.update(bytes_by_space(output_type))
  return traffic


def group_size(attributes: str):
  """Devices per replica group of a collective, from its replica_groups attribute, or None.

  Three spellings: mesh['axis_0'=2,'axis_1'=4] {'axis_1'} (the named axes' product, possibly
  with device_ids=(...) between), [groups,size]<=[devices] (iota), and {{0,1},{2,3}} (explicit).
  """
  named = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attributes)
  if named:
    sizes = {axis: int(size) for axis, size in re.findall(r"'(\w+)'=(\d+)", named.group(1))}
    return math.prod(sizes[axis] for axis in re.findall(r"'(\w+)'", named.group(2)))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
  if iota:
    return int(iota.group(2))
  explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
  return len(explicit.group(1).split(",")) if explicit else None


def _wire_factor(kind: str, size) -> float:
  """Bytes each device sends per byte of `bytes` in a ring over `size` devices: (n-1)/n of the
  gathered (or scattered) array, twice that for an all-reduce (a reduce-scatter, then an
  all-gather), and the whole buffer for a permute. An unknown group size counts as large."""
  if kind == "collective-permute":
    return 1.0
  share = (size - 1) / size if size else 1.0
  return 2 * share if kind == "all-reduce" else share


def _collective(op: dict, types: dict, computations: dict):
  """(kind, bytes, wire bytes, attributes) of one execution of a collective instruction, or None.

  Bytes are the larger of the collective's operands and result; wire bytes what each device
  sends over the interconnect in a ring algorithm (_wire_factor). TPU wraps collectives in
  fusions: a reduce-scatter is a fusion of an all-reduce and the dynamic slice each device keeps
  (counted as one reduce-scatter of the unscattered operand), and an all-gather may be fused with
  the matmul that consumes it; only the collective's own operands and result count, not the
  fusion's.
  """
  kind = op["opcode"].removesuffix("-start")
  if kind in COLLECTIVES:
    operand_bytes = sum(shape_bytes(types.get(o, "")) for o in op["operands"])
    result_bytes = shape_bytes(op["type"])
    if op["opcode"].endswith("-start") and op["type"].startswith("("):
      result_bytes = max(result_bytes - operand_bytes, 0.0)  # (operands, results) tuple
    moved = max(operand_bytes, result_bytes)
    wire = moved * _wire_factor(kind, group_size(op["attributes"]))
    return kind, moved, wire, op["attributes"]
  if op["opcode"] != "fusion" or "calls" not in op["called"]:
    return None
  fused = computations.get(op["called"]["calls"], [])
  fused_types = {f["name"]: f["type"] for f in fused}
  inner = [_collective(f, fused_types, computations) for f in fused]
  inner = [found for found in inner if found]
  if not inner:
    return None
  kinds = [found[0] for found in inner]
  moved, wire = sum(found[1] for found in inner), sum(found[2] for found in inner)
  if kinds == ["all-reduce"] and fused[-1]["opcode"] == "dynamic-slice":
    # the all-gather half of the all-reduce is skipped
    return "reduce-scatter", moved, wire / 2, inner[0][3]
  return kinds[0], moved, wire, inner[0][3]


def step_totals(hlo_text: str) -> dict:
  """Per-call totals of a compiled module (see the module docstring)."""
  computations, entry = parse_module(hlo_text)
  control, fused, unknown_loops = _multiplicities(computations, entry)
  flops, traffic = 0.0, collections.Counter()
  collectives = {kind: {"count": 0, "bytes": 0.0, "wire_bytes": 0.0} for kind in COLLECTIVES}
  for name, times in list(control.items()) + list(fused.items()):
    ops = computations.get(name, [])
    types = {op["name"]: op["type"] for op in ops}
    for op in ops:
      if op["opcode"] in ("dot", "convolution"):
        flops += times * _matmul_flops(op, types)
      if name not in control or op["opcode"] in _NO_TRAFFIC:
        continue
      collective = _collective(op, types, computations)
      if collective:
        kind, moved, wire, _ = collective
        collectives[kind]["count"] += times
        collectives[kind]["bytes"] += times * moved
        collectives[kind]["wire_bytes"] += times * wire
      for space, moved in _traffic(op, types, computations).items():
        traffic[space] += times * moved
  vmem_bytes, host_bytes = traffic.pop(VMEM_SPACE, 0.0), traffic.pop(HOST_SPACE, 0.0)
  return dict(matmul_flops=flops, hbm_bytes=float(sum(traffic.values())), vmem_bytes=vmem_bytes,
              host_bytes=host_bytes, collectives=collectives, unknown_loops=unknown_loops)


_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def dcn_transfers(hlo_text: str) -> list[dict]:
  """The cross-slice collectives of a multislice program, one dict each: kind ("all-reduce",
  ...), bytes (each chip's buffer) and count (executions per call of the entry).

  A multislice program is compiled for one slice: what crosses slices is not a collective but a
  host-transfer send to the megascale runtime, which does it over the data-center network,
  marked _xla_megascale_transfer_type="ALL_REDUCE" (or another kind).
  """
  computations, entry = parse_module(hlo_text)
  control, _, _ = _multiplicities(computations, entry)
  transfers = []
  for name, times in control.items():
    types = {op["name"]: op["type"] for op in computations.get(name, [])}
    for op in computations.get(name, []):
      kind = _MEGASCALE.search(op["attributes"]) if op["opcode"] == "send" else None
      if kind:
        transfers.append(dict(kind=kind.group(1).lower().replace("_", "-"), name=op["name"],
                              bytes=shape_bytes(types.get(op["operands"][0], "")),
                              count=times))
  return transfers


def collective_calls(hlo_text: str) -> list[dict]:
  """Each collective instruction of a compiled module, with what step_totals sums over them.

  Returns dicts with kind (e.g. "all-gather"), name, computation, result and operands (HLO type
  texts), replica_groups (the attribute's text), groups (its device ids, replica_groups.expand;
  None if it names none), pairs (a permute's (source, target) ids), count (executions per call
  of the entry, loops counted by trip count), bytes and wire_bytes (per execution, as in
  step_totals). A collective fused with other work (TPU) is reported with the fusion's name and
  the collective's replica groups.
  """
  computations, entry = parse_module(hlo_text)
  control, _, _ = _multiplicities(computations, entry)
  calls = []
  for name, times in control.items():
    ops = computations.get(name, [])
    types = {op["name"]: op["type"] for op in ops}
    for op in ops:
      collective = _collective(op, types, computations)
      if not collective:
        continue
      kind, moved, wire, attributes = collective
      operand_types = [types.get(o, "") for o in op["operands"]]
      groups = re.search(r"replica_groups=(\S+(?: \{[^}]*\})?)", attributes)
      calls.append(dict(kind=kind, name=op["name"], computation=name, result=op["type"],
                        operands=operand_types, replica_groups=groups.group(1) if groups else "",
                        groups=replica_groups.expand(attributes),
                        pairs=replica_groups.source_target_pairs(attributes),
                        count=times, bytes=moved, wire_bytes=wire))
  return calls
