"""Train / held-out split by a stable hash of each item's id.

The id is the file path relative to the source root (plus ':line' for JSON Lines documents, or
the id stored by the prepare tools), so the split depends on neither the listing order, the
process count nor the machine, and an item never moves between splits as files are added.
"""

import hashlib

import numpy as np

SPLITS = ("train", "heldout")


def heldout_score(item_id: str) -> float:
  """A number in [0, 1) that is a fixed function of the id (first 8 bytes of its SHA-1)."""
  digest = hashlib.sha1(item_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout(item_id: str, heldout_fraction: float) -> bool:
  return heldout_score(item_id) < heldout_fraction


def split_indices(item_ids, split: str, heldout_fraction: float) -> np.ndarray:
  """Indices (int64, ascending) of the items that belong to `split` ("train" or "heldout")."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f"data.heldout_fraction must be in [0, 1), got {heldout_fraction!r}")
  want_heldout = split == "heldout"
  chosen = [index for index, item_id in enumerate(item_ids)
            if is_heldout(item_id, heldout_fraction) == want_heldout]
  return np.asarray(chosen, dtype=np.int64)
