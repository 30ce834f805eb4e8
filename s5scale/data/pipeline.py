"""make_iterator: the grain graph from a data config, split and process layout.

  items of the split in id order (split.py)                              MapDataset, random access
    → shuffle(data.seed) per epoch (train) → repeat(num_epochs)
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

import grain
import numpy as np

from s5scale.data import bad_data
from s5scale.data import split as split_lib
from s5scale.data import transforms
from s5scale.data.packing import PackRowsIterDataset, ShardRowsIterDataset


def local_batch_size(data_config, process_count: int) -> int:
  if data_config.batch_size <= 0 or data_config.batch_size % process_count:
    raise ValueError(f"data.batch_size={data_config.batch_size} must be a positive multiple of "
                     f"the process count {process_count}")
  return data_config.batch_size // process_count


def _rows(data_config, split, spec, process_index, process_count, num_epochs):
  """IterDataset of rows (packing.py format, or classify rows) for this process."""
  train = split == "train"
  listed = spec.source.listed_split
  indices = split_lib.split_indices(spec.source.ids, split, data_config.heldout_fraction, listed)
  indices = indices[np.isin(indices, spec.usable_indices)]
  if indices.size == 0:
    rule = ("its testing_list.txt" if listed is not None
            else f"data.heldout_fraction={data_config.heldout_fraction}")
    raise bad_data.DataError(f"the {split} split of {spec.source.description} is empty ({rule}, "
                             f"{len(spec.source)} items)")
  items = grain.MapDataset.source(indices)
  if train:
    items = items.shuffle(seed=data_config.seed)   # grain reshuffles each epoch (seed + epoch)
  items = items.repeat(num_epochs)
  loader = spec.loader(train)
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
  stream = stream.filter(bad_data.MarkerFilter(len(indices), spec.source.description))
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
  spec = transforms.make_spec(data_config)
  stream = _rows(data_config, split, spec, process_index, process_count, num_epochs)
  description = f"the {split} split of {spec.source.description}"
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
