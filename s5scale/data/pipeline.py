"""make_iterator: the grain graph from a data config, split and process layout.

  items of the split in id order (split.py)                              MapDataset, random access
    (data.heldout_source set: train is all of data.source, held-out all of heldout_source)
    → shuffle(data.seed) per epoch (train) → repeat(num_epochs)
    → [data.mixture] tag each source's items, mix them by weight (train) or concatenate
      (held-out) with grain (mixture.py)
    → [train, unpacked] keep global index ≡ process_index (mod process_count)
    → read + decode (+ random crop) in data.num_workers grain processes  (bad item → marker)
  main process:
    → drop/count/log markers → pack documents into rows (text; audio eval windows)
    → [heldout, or packed] every process builds the same rows and keeps every
      process_count-th, (held-out: padded to equal length)
    → batch(data.batch_size // process_count) → the batch dict the trainer consumes

Element k of a process's stream is a fixed function of (seed, k, process layout), so the batch
at step k is too, and the iterator state (all ints) resumes it exactly. The global batch at step k
holds the same examples whatever the process count (only their order across hosts changes). Batches do not depend on
data.num_workers: grain interleaves the workers' slices back into the global order, and every
many-to-one stage (filtering, packing) runs after that in the main process.

Evaluation reads the whole held-out split in every process (it is small) so that all processes
know the total row count and stop after the same number of batches without talking to each other.
"""

from typing import NamedTuple

import grain
import numpy as np

from s5scale.data import bad_data
from s5scale.data import mixture
from s5scale.data import split as split_lib
from s5scale.data import transforms
from s5scale.data.packing import PackRowsIterDataset, ShardRowsIterDataset


def local_batch_size(data_config, process_count: int) -> int:
  if data_config.batch_size <= 0 or data_config.batch_size % process_count:
    raise ValueError(f"data.batch_size={data_config.batch_size} must be a positive multiple of "
                     f"the process count {process_count}")
  return data_config.batch_size // process_count


class Component(NamedTuple):
  name: str          # "" for a lone data.source
  spec: transforms.Spec
  weight: float


def components(data_config, split: str = "train") -> list[Component]:
  """The sources a split reads: data.source alone (data.heldout_source for "heldout" when it is
  set), or each entry of data.mixture (mixture.py)."""
  entries = mixture.parse(data_config.mixture)
  if entries and (data_config.source or data_config.heldout_source):
    # defaults.RULES say so too; in-process callers skip that check.
    raise ValueError(f"data.mixture={data_config.mixture!r} names the sources, so data.source "
                     f"(got {data_config.source!r}) and data.heldout_source (got "
                     f"{data_config.heldout_source!r}) must be '': each mixture source is "
                     "split by data.heldout_fraction")
  if not entries:
    return [Component("", transforms.make_spec(data_config, split), 1.0)]
  parts = []
  for entry in entries:
    source_config = data_config.copy_and_resolve_references().unlock()
    source_config.source, source_config.mixture = entry.source, ""
    parts.append(Component(entry.name, transforms.make_spec(source_config), entry.weight))
  return parts


def heldout_splits(data_config) -> list[str]:
  """"heldout", then "heldout/<name>" for each source of a mixture."""
  return ["heldout"] + [f"heldout/{entry.name}" for entry in mixture.parse(data_config.mixture)]


def _items(data_config, split, number, spec, num_epochs):
  """MapDataset of (source number, item index) over one source's split, shuffled for train."""
  listed = spec.source.listed_split
  if data_config.heldout_source:
    # Named held-out data: each split is all of its own source (components() picked it).
    indices = np.arange(len(spec.source), dtype=np.int64)
  else:
    indices = split_lib.split_indices(spec.source.ids, split, data_config.heldout_fraction, listed)
  indices = indices[np.isin(indices, spec.usable_indices)]
  if indices.size == 0:
    rule = (f"data.heldout_source={data_config.heldout_source!r}" if data_config.heldout_source
            else "its testing_list.txt" if listed is not None
            else f"data.heldout_fraction={data_config.heldout_fraction}")
    raise bad_data.DataError(f"the {split} split of {spec.source.description} is empty ({rule}, "
                             f"{len(spec.source)} items)")
  items = grain.MapDataset.source(indices)
  if split == "train":
    # grain reshuffles each epoch (seed + epoch); each source of a mixture has its own order.
    items = items.shuffle(seed=data_config.seed + number)
  return items.repeat(num_epochs).map(mixture.TagIndex(number)), indices.size


def _rows(data_config, split, parts, process_index, process_count, num_epochs):
  """IterDataset of rows (packing.py format, or classify rows) for this process."""
  train = split == "train"
  spec = parts[0].spec        # the sources of a mixture differ only in data.source
  tagged = [_items(data_config, split, number, part.spec, num_epochs)
            for number, part in enumerate(parts)]
  num_items = sum(size for _, size in tagged)
  if len(parts) == 1:
    items = tagged[0][0]
  elif train:
    items = grain.MapDataset.mix([items for items, _ in tagged], [p.weight for p in parts])
  else:
    items = grain.MapDataset.concatenate([items for items, _ in tagged])
  loader = mixture.TaggedLoader([part.spec.loader(train) for part in parts])
  if loader.is_random:
    items = items.random_map(loader, seed=data_config.seed)
  else:
    items = items.map(loader)
  if train and spec.packing(train) is None:
    # Strided items: the global batch at step k holds the same examples for any process count.
    items = items[process_index::process_count]
  stream = items.to_iter_dataset(grain.ReadOptions(
      num_threads=data_config.read_threads, prefetch_buffer_size=4 * data_config.read_threads))
  if data_config.num_workers > 0:
    _ensure_absl_flags_parsed()
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.num_workers, per_worker_buffer_size=4))
  description = " + ".join(part.spec.source.description for part in parts)
  stream = stream.filter(bad_data.MarkerFilter(num_items, description))
  stream = stream.map(mixture.CountSources([part.name for part in parts if part.name]))
  packing = spec.packing(train)
  if packing is not None:
    stream = PackRowsIterDataset(stream, data_config.seq_len + 1, spec.pad_id,
                                 across_documents=packing == "across_documents")
  return stream


def make_iterator(data_config, split, *, process_index=0, process_count=1, num_epochs=None):
  """A grain DatasetIterator of NumPy batches for this process (see s5scale.data).

  A finite *train* stream (num_epochs set) is padded per process, so with several processes
  their batch counts can differ by one; held-out streams always end together.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  batch_size = local_batch_size(data_config, process_count)
  split, _, source_name = split.partition("/")     # "heldout/<name>": one mixture source
  parts = components(data_config, split)
  if source_name:
    parts = [part for part in parts if part.name == source_name]
    if not parts or split != "heldout":
      raise ValueError(f"split {split}/{source_name}: not a held-out split of data.mixture="
                       f"{data_config.mixture!r}")
  spec = parts[0].spec
  stream = _rows(data_config, split, parts, process_index, process_count, num_epochs)
  description = f"the {split} split of " + " + ".join(p.spec.source.description for p in parts)
  if split == "heldout" or spec.packing(split == "train") is not None:
    # Packed rows depend on every document before them, so each process packs the same global
    # stream and keeps every process_count-th row: again layout-independent global batches.
    stream = ShardRowsIterDataset(stream, process_index, process_count, batch_size,
                                  spec.padding_row, description)
  elif num_epochs is not None:
    stream = ShardRowsIterDataset(stream, 0, 1, batch_size, spec.padding_row, description)
  stream = stream.batch(batch_size, drop_remainder=True).map(spec.finalize)
  return iter(stream)


def _ensure_absl_flags_parsed():
  """grain's worker processes read absl flags; outside an absl app (tests, notebooks) nobody
  has parsed them, and grain would raise UnparsedFlagAccessError."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
