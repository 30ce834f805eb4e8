"""Weighted mixtures of sources (data.mixture), mixed by grain before any item is read.

  data.mixture = "code=/data/python:0.7,/data/books/*.txt:0.3"

Each entry is [name=]source:weight, the source written as data.source takes it (directory, glob,
ArrayRecord shards); the name defaults to the source's last fixed path component ("books" above)
and names the per-source counters (`data/examples/<name>` in metrics.jsonl) and held-out splits
(`heldout/<name>` in eval/metrics.jsonl). Weights are relative (they need not sum to 1).

The pipeline tags each source's item indices with the source's number and mixes the tagged index
datasets with grain's MapDataset.mix: a deterministic interleaving in the weights' proportions,
random access by position. So the mixture's iterator state is one position that covers every
source, a resumed run continues bit for bit, and striding positions over processes gives
disjoint shards whose union is the single-process stream.
"""

import collections
import os
from typing import NamedTuple

from s5scale.data import bad_data

SOURCE_KEY = "source"      # the element key carrying the source number until it is counted
_counts: collections.Counter = collections.Counter()


class Entry(NamedTuple):
  name: str
  source: str
  weight: float


def _default_name(source: str) -> str:
  fixed = [part for part in source.rstrip("/").split("/") if part and not any(
      character in part for character in "*?[")]
  name = fixed[-1] if fixed else source
  return os.path.splitext(name)[0] if name.endswith(".array_record") else name


def parse(mixture: str) -> list[Entry]:
  """data.mixture -> entries; [] when empty. Raises ValueError naming data.mixture."""
  entries = []
  for text in (part.strip() for part in mixture.split(",")):
    if not text:
      continue
    named, colon, weight_text = text.rpartition(":")
    try:
      weight = float(weight_text) if colon else float("nan")
    except ValueError:
      weight = float("nan")
    if not named or not weight > 0:
      raise ValueError(f"data.mixture entry {text!r} must be [name=]source:weight with a "
                       f"positive weight, got data.mixture={mixture!r}")
    name, equals, source = named.partition("=")
    if not equals or "/" in name:
      name, source = _default_name(named), named
    entries.append(Entry(name, source, weight))
  names = [entry.name for entry in entries]
  if len(set(names)) != len(names):
    raise ValueError(f"data.mixture names must differ, got {names} from data.mixture="
                     f"{mixture!r}; name them as name=source:weight")
  if len(entries) == 1:
    raise ValueError(f"data.mixture={mixture!r} has one source; use data.source for that")
  return entries


class TagIndex:
  """item index -> (source number, item index): the mixture tells the loader whose item it is."""

  def __init__(self, source_number: int):
    self._source_number = source_number

  def __call__(self, index):
    return self._source_number, int(index)


class TaggedLoader:
  """(source number, index) -> that source's loader output, tagged with SOURCE_KEY."""

  def __init__(self, loaders: list):
    self._loaders = loaders
    self.is_random = any(loader.is_random for loader in loaders)

  def __call__(self, tagged, rng=None):
    source_number, index = tagged
    loader = self._loaders[source_number]
    element = loader(index, rng) if loader.is_random else loader(index)
    if not bad_data.is_marker(element):
      element[SOURCE_KEY] = source_number
    return element


class CountSources:
  """Main-process map: counts each example under its source's name and drops the tag (so rows
  keep the layout padding rows have)."""

  def __init__(self, names: list[str]):
    self._names = names

  def __call__(self, element):
    source_number = element.pop(SOURCE_KEY)
    if self._names:
      _counts[f"examples/{self._names[source_number]}"] += 1
    return element


def counts() -> dict[str, int]:
  """{"examples/<name>": n} examples read from each mixture source so far in this process."""
  return dict(_counts)
