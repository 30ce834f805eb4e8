"""Train / held-out split by a stable hash of each item's split key.

The key is the item's id: the file path relative to the source root (plus ':line' for JSON Lines
documents, or the id stored by the prepare tools). So the split depends on neither the listing
order, the process count nor the machine, and an item never moves between splits as files are
added. One exception groups by speaker: an audio file named "<speaker>_nohash_<n>.<ext>" (the
Speech Commands convention, also used by tools/make_spoken_digits.py) is keyed by <speaker>, so all
of one speaker's clips, in every word folder, land in the same split and held-out accuracy
measures unseen voices. Prepared shards store the same relative paths as ids: the same split.

A Speech Commands root with its own testing_list.txt replaces the hash (sources.ListedSplit).
data.heldout_source replaces both: held-out is all of it, train all of data.source (pipeline.py).
"""

import hashlib

import numpy as np

from s5scale.data.sources import AUDIO_EXTENSIONS

SPLITS = ("train", "heldout")
CHUNK_MARK = "#"          # shards.CHUNK_MARK (not imported: shards imports the writers)
SPEAKER_MARK = "_nohash_"


def split_key(item_id: str) -> str:
  """The string hashed: the speaker of "<word>/<speaker>_nohash_<n>.wav", else the id itself.

  Chunks that tools/prepare_audio.py cut from one long file ("book.flac#00012") are keyed by
  the file, so a file's chunks share its split, the one the raw file has.
  """
  item_id = chunk_of(item_id)[0]
  basename = item_id.rsplit("/", 1)[-1]
  speaker, mark, _ = basename.partition(SPEAKER_MARK)
  if mark and speaker and basename.lower().endswith(AUDIO_EXTENSIONS):
    return speaker
  return item_id


def chunk_of(item_id: str) -> tuple[str, int | None]:
  """("book.flac", 12) for the chunk id "book.flac#00012"; (item_id, None) for any other id."""
  stem, mark, number = item_id.rpartition(CHUNK_MARK)
  if mark and number.isdigit() and stem.lower().endswith(AUDIO_EXTENSIONS):
    return stem, int(number)
  return item_id, None


def heldout_score(key: str) -> float:
  """A number in [0, 1) that is a fixed function of the key (first 8 bytes of its SHA-1)."""
  digest = hashlib.sha1(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout(item_id: str, heldout_fraction: float) -> bool:
  return heldout_score(split_key(item_id)) < heldout_fraction


def split_indices(item_ids, split: str, heldout_fraction: float, listed=None) -> np.ndarray:
  """Indices (int64, ascending) of the items that belong to `split` ("train" or "heldout").

  listed: None, or a sources.ListedSplit (index arrays read from a Speech Commands root): then
  held-out is exactly listed.heldout, listed.excluded is in neither split, and train is the rest;
  heldout_fraction is not used.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if listed is not None:
    if split == "heldout":
      return np.asarray(listed.heldout, dtype=np.int64)
    not_train = np.concatenate([listed.heldout, listed.excluded])
    return np.setdiff1d(np.arange(len(item_ids), dtype=np.int64), not_train)
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f"data.heldout_fraction must be in [0, 1), got {heldout_fraction!r}")
  want_heldout = split == "heldout"
  chosen = [index for index, item_id in enumerate(item_ids)
            if is_heldout(item_id, heldout_fraction) == want_heldout]
  return np.asarray(chosen, dtype=np.int64)
