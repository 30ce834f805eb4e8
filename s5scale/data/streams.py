"""Carried-state streams (data.carry_state): each batch row reads whole long items in order.

Train: global lane j (row j of the global batch; process p holds lanes p*b .. p*b + b - 1,
b = B / process_count) reads the shuffled, repeated train items at positions j, j + B, j + 2B, ...
(B = data.batch_size), whole (no crops). packing.py's packer concatenates them and cuts the
concatenation into rows of L + 1 at stride L (L = data.seq_len), so window k of a lane covers its
stream positions [kL, kL + L]: consecutive windows overlap by one token and no target is lost
between steps. Reset marks each item's first token; the mask drops the target that would cross
into the next item. A lane's stream is a function of (data.seed, j) alone, so the global batch
at step k is the same for any process count, and the iterator state (per lane: the item
position and the offset into it, all ints) resumes it bit for bit.

Held-out: `heldout_batches` gives each row one item, from its first window to its last, then
padding rows until the longest item of its group of B is done; then the next group.
"""

import itertools
import math

import grain
import numpy as np

from s5scale.data.packing import PackRowsIterDataset

# A lane needs its next item only every (item length / L) steps, and an item read ahead costs a
# whole decode (short files) or a first pass for the peak (long ones, audio_streams.py): one
# reader thread and one item read ahead per lane.
_LANE_READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)


class LanesIterDataset(grain.IterDataset):
  """One row per lane, stacked: {key: (lanes, row_length)} in the packer's row format."""

  def __iter__(self):
    return _LanesIterator([lane.__iter__() for lane in self._parents])


class _LanesIterator(grain.DatasetIterator):

  def __init__(self, lanes):
    super().__init__(lanes)
    self._lanes = lanes

  def __next__(self):
    rows = [next(lane) for lane in self._lanes]
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

  def get_state(self):
    return {"lanes": [lane.get_state() for lane in self._lanes]}

  def set_state(self, state):
    for lane, lane_state in zip(self._lanes, state["lanes"]):
      lane.set_state(lane_state)


def train_lanes(items, spec, checked, data_config, process_index: int,
                local_batch: int) -> grain.IterDataset:
  """This process's lanes over `items` (pipeline.loaded_items: shuffled, repeated, whole).

  checked(stream) drops bad items (logged, counted) and counts mixture sources; the caller makes
  one for all lanes, since "every item is bad" is a fact about the split, not about a lane.
  """
  first = process_index * local_batch
  lanes = []
  for lane in range(first, first + local_batch):
    stream = checked(items[lane::data_config.batch_size].to_iter_dataset(_LANE_READ))
    lanes.append(PackRowsIterDataset(stream, data_config.seq_len + 1, spec.pad_id,
                                     across_documents=True))
  return LanesIterDataset(lanes)


def _windows(length: int, seq_len: int) -> int:
  """Rows the packer cuts from one item of `length` tokens (each needs an input and a target)."""
  return max(0, math.ceil((length - 1) / seq_len))


def heldout_batches(examples, spec, batch_size: int, seq_len: int, process_index: int,
                    process_count: int):
  """Batches of rows, each streaming one item of `examples` (an IterDataset every process reads
  whole, so all of them know every group's length and yield the same number of batches)."""
  local = batch_size // process_count
  first = process_index * local
  padding = spec.padding_row
  group = []
  for example in itertools.chain(examples, [None]):     # None: the end, flush the last group
    if example is not None:
      group.append(example)
      if len(group) < batch_size:
        continue
    if not group:
      break
    num_windows = max(_windows(len(item["tokens"]), seq_len) for item in group)
    rows = [iter(PackRowsIterDataset(grain.MapDataset.source([item]).to_iter_dataset(),
                                     seq_len + 1, spec.pad_id, across_documents=False))
            for item in group[first:first + local]]
    for _ in range(num_windows):
      windows = [next(row, None) for row in rows]
      windows += [None] * (local - len(windows))
      windows = [padding if window is None else window for window in windows]
      yield spec.finalize({key: np.stack([w[key] for w in windows]) for key in padding})
    group = []
