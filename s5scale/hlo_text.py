"""Reading a compiled HLO module's text: its computations and instructions, and the bytes of an
HLO type in each memory space (hlo_stats.py counts with them)."""

import collections
import math
import re

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")
_CALLED = re.compile(r"\b(calls|body|to_apply|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def bytes_by_space(type_text: str) -> collections.Counter:
  """{memory space: bytes} of an HLO type (an array `f32[2,3]{1,0:T(8,128)S(1)}` or a tuple of
  them); an array with no S(n) in its layout is in space 0."""
  totals = collections.Counter()
  for dtype, shape, layout in _ARRAY.findall(type_text):
    size = math.prod(int(d) for d in shape.split(",") if d)
    space = _MEMORY_SPACE.search(layout)
    totals[int(space.group(1)) if space else 0] += size * _DTYPE_BYTES.get(dtype, 1)
  return totals


def shape_bytes(type_text: str) -> float:
  """Bytes of an HLO type, in any memory space."""
  return float(sum(bytes_by_space(type_text).values()))


def dims(type_text: str) -> list[int]:
  match = _ARRAY.search(type_text)
  return [int(d) for d in match.group(2).split(",") if d] if match else []


def _split_type(rest: str) -> tuple[str, str]:
  """'(f32[2], s32[]) while(...)' -> ('(f32[2], s32[])', ' while(...)')."""
  if not rest.startswith("("):
    head, _, tail = rest.partition(" ")
    return head, " " + tail
  depth = 0
  for index, char in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return rest[:index + 1], rest[index + 1:]
  return rest, ""


def _operands(text: str) -> tuple[list[str], str, str]:
  """For '(%a, %b), attrs': the operand names, the text inside the parentheses, the attributes."""
  depth = 0
  for index, char in enumerate(text):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0 and char == ")":
      inner = text[1:index]
      return re.findall(r"%([\w.\-]+)", inner), inner.strip(), text[index + 1:]
  return re.findall(r"%([\w.\-]+)", text), "", ""


def parse_module(hlo_text: str) -> tuple[dict, str]:
  """{computation: [instruction dicts]} and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    match = _INSTRUCTION.match(line) if current else None
    if not match:
      continue
    type_text, rest = _split_type(match.group(2))
    opcode = _OPCODE.match(rest)
    if not opcode:
      continue
    operands, inner, attributes = _operands(rest[opcode.end() - 1:])
    computations[current].append(dict(
        name=match.group(1), type=type_text, opcode=opcode.group(1), operands=operands,
        inner=inner,
        attributes=attributes, called=dict(_CALLED.findall(attributes)),
        branches=re.findall(r"%([\w.\-]+)", " ".join(_BRANCHES.findall(attributes)))))
  return computations, entry


def space_of(type_text: str) -> int:
  """The memory space holding most of a type's bytes (an array has one)."""
  spaces = bytes_by_space(type_text)
  return max(spaces, key=spaces.get) if spaces else 0
