"""Declarative config constraints: the machinery that config_check.py runs over defaults.py.

defaults.py declares each key as `name=field(default, constraint)`, and rules that tie keys
together as `Rule(keys, holds, allowed)`. `violations(config)` checks a resolved config against
them and names, for each violation, the key, its value and what is allowed. It imports nothing
from the rest of s5scale.

Constraints: Int, Real, OneOf, Bool, Text, and Check(predicate, allowed) for anything else (a
dict- or list-valued key). Each knows `accepts(value)` and says `allowed`.
"""

import dataclasses
import math
from typing import Any, Callable, Sequence

import ml_collections


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key (maps to exit 2)."""


class Constraint:
  allowed: str = ""

  def accepts(self, value) -> bool:
    raise NotImplementedError


def _bounds_text(ge, gt, le, lt) -> str:
  parts = [f"{op} {bound}" for op, bound in ((">=", ge), (">", gt), ("<=", le), ("<", lt))
           if bound is not None]
  return " and ".join(parts)


def _within(value, ge, gt, le, lt) -> bool:
  return ((ge is None or value >= ge) and (gt is None or value > gt)
          and (le is None or value <= le) and (lt is None or value < lt))


@dataclasses.dataclass(frozen=True)
class Int(Constraint):
  """A whole number (not a bool) within the bounds, or one of `also` (e.g. -1 = fill the rest)."""
  ge: int | None = None
  le: int | None = None
  also: tuple = ()

  def accepts(self, value) -> bool:
    if value in self.also and isinstance(value, int) and not isinstance(value, bool):
      return True
    return (isinstance(value, int) and not isinstance(value, bool)
            and _within(value, self.ge, None, self.le, None))

  @property
  def allowed(self) -> str:
    bounds = _bounds_text(self.ge, None, self.le, None)
    text = f"an integer {bounds}" if bounds else "an integer"
    return text + "".join(f" or {v}" for v in self.also)


@dataclasses.dataclass(frozen=True)
class Real(Constraint):
  """A finite number (int or float, not bool) within the bounds."""
  ge: float | None = None
  gt: float | None = None
  le: float | None = None
  lt: float | None = None

  def accepts(self, value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and _within(value, self.ge, self.gt, self.le, self.lt))

  @property
  def allowed(self) -> str:
    bounds = _bounds_text(self.ge, self.gt, self.le, self.lt)
    return f"a finite number {bounds}" if bounds else "a finite number"


@dataclasses.dataclass(frozen=True)
class OneOf(Constraint):
  choices: tuple

  def __init__(self, *choices):
    object.__setattr__(self, "choices", choices)

  def accepts(self, value) -> bool:
    # type check too: True == 1 would otherwise pass for a choice of 1.
    return any(type(value) is type(c) and value == c for c in self.choices)

  @property
  def allowed(self) -> str:
    return "one of " + ", ".join(repr(c) for c in self.choices)


@dataclasses.dataclass(frozen=True)
class Bool(Constraint):
  allowed: str = "True or False"

  def accepts(self, value) -> bool:
    return isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Text(Constraint):
  """Any string (paths, prompts); `nonempty` when "" cannot mean anything."""
  nonempty: bool = False

  def accepts(self, value) -> bool:
    return isinstance(value, str) and (bool(value) or not self.nonempty)

  @property
  def allowed(self) -> str:
    return "a non-empty string" if self.nonempty else "a string"


@dataclasses.dataclass(frozen=True)
class Check(Constraint):
  """Any other test, e.g. `Check(lambda v: all(w > 0 for w in v.values()), "positive weights")`."""
  predicate: Callable[[Any], bool]
  allowed: str

  def accepts(self, value) -> bool:
    try:
      return bool(self.predicate(value))
    except Exception:  # pylint: disable=broad-except  (a value of the wrong shape fails the check)
      return False


@dataclasses.dataclass(frozen=True)
class Field:
  default: Any
  constraint: Constraint


def field(default, constraint: Constraint) -> Field:
  return Field(default, constraint)


@dataclasses.dataclass(frozen=True)
class Rule:
  """A constraint across keys: `holds(*values of keys)` must be true; `allowed` says the rule."""
  keys: tuple[str, ...]
  holds: Callable[..., bool]
  allowed: str


def build_config(sections: dict[str, dict[str, Field]]) -> ml_collections.ConfigDict:
  """The ConfigDict of defaults; fails at import if a key was declared without a constraint."""
  config = ml_collections.ConfigDict()
  for section_name, fields in sections.items():
    for name, declared in fields.items():
      if not isinstance(declared, Field):
        raise TypeError(f"defaults.py: {section_name}.{name} has no constraint; declare it as "
                        f"field(default, Int(...)/Real(...)/OneOf(...)/Bool()/Text())")
    config[section_name] = ml_collections.ConfigDict(
        {name: declared.default for name, declared in fields.items()})
  return config


def constraints_of(sections: dict[str, dict[str, Field]]) -> dict[str, Constraint]:
  """Flat "section.key" -> constraint."""
  return {f"{section_name}.{name}": declared.constraint
          for section_name, fields in sections.items() for name, declared in fields.items()}


def flat_values(config, declared=(), prefix: str = "") -> dict[str, Any]:
  """"section.key" -> value; a dict under a key in `declared` is that key's value, not a section."""
  values = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)) and name not in declared:
      values.update(flat_values(value, declared, f"{name}."))
    else:
      values[name] = value
  return values


def violations(config, constraints: dict[str, Constraint], rules: Sequence[Rule]) -> list[str]:
  """Every way `config` breaks its constraints, one line each naming key, value and what is
  allowed. A rule is checked only when each of its keys passed on its own."""
  values = flat_values(config, constraints)
  found, bad_keys = [], set()
  for key, value in values.items():
    constraint = constraints.get(key)
    if constraint is None:
      found.append(f"{key}={value!r}: no such key in s5scale/defaults.py (every key needs a "
                   "default and a constraint there)")
      bad_keys.add(key)
    elif not constraint.accepts(value):
      shown = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
      found.append(f"{key}={shown!r}: must be {constraint.allowed}")
      bad_keys.add(key)
  for key in constraints.keys() - values.keys():
    found.append(f"{key} is missing from the config (declared in s5scale/defaults.py)")
    bad_keys.add(key)
  for rule in rules:
    if bad_keys & set(rule.keys):
      continue
    if not rule.holds(*(values[k] for k in rule.keys)):
      shown = ", ".join(f"{k}={values[k]!r}" for k in rule.keys)
      found.append(f"{shown}: need {rule.allowed}")
  return found
