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
  data.carry_state (train): whole items instead of crops; row j of the global batch is a lane
  reading items j, j + B, ... and packing them in order (streams.py); no worker processes.

Element k of a process's stream is a fixed function of (seed, k, process layout), so the batch
at step k is too, and the iterator state (all ints) resumes it exactly. The global batch at step k
holds the same examples whatever the process count (only their order across hosts changes). Batches do not depend on
data.num_workers: grain interleaves the workers' slices back into the global order, and every
many-to-one stage (filtering, packing) runs after that in the main process.

Evaluation reads the whole held-out split in every process (it is small) so that all processes
know the total row count and stop after the same number of batches without talking to each other.
"""

import math
from typing import NamedTuple

import grain
import numpy as np

from s5scale.data import audio_streams
from s5scale.data import bad_data
from s5scale.data import mixture
from s5scale.data import split as split_lib
from s5scale.data import streams
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


def _items(data_config, split, number, spec, num_epochs, whole_items=False):
  """MapDataset of (source number, item index) over one source's split, shuffled for train.

  whole_items (audio): a file's chunk records are one item, named by its first chunk.
  """
  listed = spec.source.listed_split
  if data_config.heldout_source:
    # Named held-out data: each split is all of its own source (components() picked it).
    indices = np.arange(len(spec.source), dtype=np.int64)
  else:
    indices = split_lib.split_indices(spec.source.ids, split, data_config.heldout_fraction, listed)
  indices = indices[np.isin(indices, spec.usable_indices)]
  if whole_items and spec.kind == "audio":
    indices = audio_streams.whole_recordings(spec.source, indices)
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


def loaded_items(data_config, split, parts, num_epochs, whole_items=False):
  """(MapDataset of loader outputs, number of distinct items): the split's items of every part,
  shuffled per epoch and mixed (train) or concatenated, each read and decoded when accessed.

  An element is an example or a bad-data marker. whole_items: audio recordings whole, not
  cropped, a long file's chunks joined (carried-state streams read each recording from its
  start to its end; audio_streams.py).
  """
  train = split == "train"
  tagged = [_items(data_config, split, number, part.spec, num_epochs, whole_items)
            for number, part in enumerate(parts)]
  num_items = sum(size for _, size in tagged)
  if len(parts) == 1:
    items = tagged[0][0]
  elif train:
    items = grain.MapDataset.mix([items for items, _ in tagged], [p.weight for p in parts])
  else:
    items = grain.MapDataset.concatenate([items for items, _ in tagged])
  loader = mixture.TaggedLoader([_loader(part.spec, train, whole_items) for part in parts])
  if loader.is_random:
    return items.random_map(loader, seed=data_config.seed), num_items
  return items.map(loader), num_items


def _loader(spec, train, whole_items):
  if whole_items and spec.kind == "audio":
    return audio_streams.CarriedAudioLoader(spec.source, spec.data_config, spec.loader(False))
  return spec.loader(train and not whole_items)


def description_of(parts) -> str:
  return " + ".join(part.spec.source.description for part in parts)


def _checker(parts, num_items):
  """stream -> stream: bad items dropped (logged, counted), mixture sources counted."""
  marker_filter = bad_data.MarkerFilter(num_items, description_of(parts))
  counter = mixture.CountSources([part.name for part in parts if part.name])
  return lambda stream: stream.filter(marker_filter).map(counter)


def _rows(data_config, split, parts, process_index, process_count, num_epochs):
  """IterDataset of rows (packing.py format, or classify rows) for this process."""
  train = split == "train"
  spec = parts[0].spec        # the sources of a mixture differ only in data.source
  items, num_items = loaded_items(data_config, split, parts, num_epochs)
  if train and spec.packing(train) is None:
    # Strided items: the global batch at step k holds the same examples for any process count.
    items = items[process_index::process_count]
  stream = items.to_iter_dataset(grain.ReadOptions(
      num_threads=data_config.read_threads, prefetch_buffer_size=4 * data_config.read_threads))
  if data_config.num_workers > 0:
    _ensure_absl_flags_parsed()
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.num_workers, per_worker_buffer_size=4))
  stream = _checker(parts, num_items)(stream)
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
  if split == "train" and data_config.get("carry_state", False):
    return iter(_carried_train(data_config, parts, process_index, batch_size, num_epochs))
  stream = _rows(data_config, split, parts, process_index, process_count, num_epochs)
  description = f"the {split} split of " + description_of(parts)
  if split == "heldout" or spec.packing(split == "train") is not None:
    # Packed rows depend on every document before them, so each process packs the same global
    # stream and keeps every process_count-th row: again layout-independent global batches.
    stream = ShardRowsIterDataset(stream, process_index, process_count, batch_size,
                                  spec.padding_row, description)
  elif num_epochs is not None:
    stream = ShardRowsIterDataset(stream, 0, 1, batch_size, spec.padding_row, description)
  stream = stream.batch(batch_size, drop_remainder=True).map(spec.finalize)
  return iter(stream)


def _carried_train(data_config, parts, process_index, batch_size, num_epochs):
  """data.carry_state: each row a lane reading whole train items in order (streams.py)."""
  if num_epochs is not None:
    raise ValueError("data.carry_state streams train items forever (num_epochs=None): a lane "
                     "ends its epoch in the middle of a window, at a step of its own")
  items, num_items = loaded_items(data_config, "train", parts, None, whole_items=True)
  spec = parts[0].spec
  lanes = streams.train_lanes(items, spec, _checker(parts, num_items),
                              data_config, process_index, batch_size)
  return lanes.map(spec.finalize)


def carried_heldout_iterator(data_config, batch_size, seq_len, *, process_index=0,
                             process_count=1, max_items=None, row_multiple=1):
  """Held-out batches in which each row streams one held-out item (see s5scale.data). With
  fewer items than rows the batch shrinks to the fewest multiple of row_multiple (and of the
  process count) that holds them all: every row streams its item to the end, so an empty row
  would cost as much as a full one."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  data_config = data_config.copy_and_resolve_references().unlock()
  data_config.batch_size, data_config.seq_len = batch_size, seq_len
  local_batch_size(data_config, process_count)      # checks that the batch divides
  parts = components(data_config, "heldout")
  items, num_items = loaded_items(data_config, "heldout", parts, 1, whole_items=True)
  if max_items is not None:
    items = items[:max_items]
  multiple = math.lcm(row_multiple, process_count)
  batch_size = min(batch_size, -(-len(items) // multiple) * multiple)
  # Every process reads every item: all of them must know each group's longest item.
  examples = _checker(parts, num_items)(items.to_iter_dataset(
      grain.ReadOptions(num_threads=data_config.read_threads,
                        prefetch_buffer_size=data_config.read_threads)))
  return streams.heldout_batches(examples, parts[0].spec, batch_size, seq_len, process_index,
                                 process_count)


def _ensure_absl_flags_parsed():
  """grain's worker processes read absl flags; outside an absl app (tests, notebooks) nobody
  has parsed them, and grain would raise UnparsedFlagAccessError."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
