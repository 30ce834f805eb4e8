"""Bad-data policy: skip, count and name each bad item; a source with nothing usable is an error.

Items are decoded in grain worker processes, where counters would be invisible to the trainer.
So a worker returns a *marker* element instead of raising, and the main process (which is where
`record` runs, as a grain filter after the prefetch) logs and counts it. Each bad item is logged
and counted once per process even when later epochs meet it again, so the counts read as "this
many items of the data are bad".
"""

import collections
import logging

_LOG = logging.getLogger("s5scale.data")
BAD_KEY = "bad_item"            # marker elements carry {BAD_KEY: (counter, item_id, reason)}
_counts: collections.Counter = collections.Counter()
_seen: set = set()


class DataError(ValueError):
  """A data source has no usable examples (or cannot be read at all). The trainer exits 2."""


def marker(counter: str, item_id: str, reason: str) -> dict:
  """The element a worker returns for a bad item. counter: "bad_files" or "bad_documents"."""
  return {BAD_KEY: (counter, item_id, reason)}


def is_marker(element) -> bool:
  return isinstance(element, dict) and BAD_KEY in element


def record(element) -> None:
  """Logs and counts a marker once per (counter, item id) in this process."""
  counter, item_id, reason = element[BAD_KEY]
  if (counter, item_id) in _seen:
    return
  _seen.add((counter, item_id))
  _counts[counter] += 1
  _LOG.warning("skipping bad data (%s): %s: %s", counter, item_id, reason)


def counts() -> dict[str, int]:
  """{"bad_files": n, "bad_documents": m} seen so far in this process (both keys always present)."""
  return {"bad_files": _counts["bad_files"], "bad_documents": _counts["bad_documents"]}


class MarkerFilter:
  """grain filter, run in the main process: records markers, drops them, passes real examples.

  Raises DataError once every one of the split's `num_items` items has been seen bad and none
  good, instead of spinning forever. (Counting distinct items, not a run of bad ones: a run can
  straddle an epoch boundary. Each epoch reshuffles which items a process sees, so a process
  meets all items eventually, even with many processes.)
  """

  def __init__(self, num_items: int, description: str):
    self._num_items = num_items
    self._description = description
    self._bad_ids: set | None = set()    # None once a good example has been seen

  def __call__(self, element) -> bool:
    if not is_marker(element):
      self._bad_ids = None
      return True
    record(element)
    if self._bad_ids is not None:
      self._bad_ids.add(element[BAD_KEY][1])
      if len(self._bad_ids) >= self._num_items:
        raise DataError(f"no usable examples in {self._description}: all {self._num_items} "
                        "items are bad (the warnings above name each one)")
    return False
