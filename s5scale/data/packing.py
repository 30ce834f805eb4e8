"""Stateful row stages of the pipeline: packing documents into rows, and sharding/padding rows.

Both are grain IterDatasets whose iterator state is plain JSON (ints, bools, nested parent
state), so a checkpointed iterator resumes exactly in a new process.

Row format (every key is a NumPy array over the row_length = seq_len + 1 positions):
  tokens        int32   the ids; inputs are tokens[:-1] and targets tokens[1:]
  token_bytes   int32   source bytes each token accounts for (for bits per byte)
  is_doc_start  bool    True where a document's first token sits (the model resets there)
  valid         bool    False on padding after the end of the data
Consecutive rows overlap by one token (stride = seq_len), so every next-token transition of the
stream is a target exactly once: the last target of a row is the first input of the next.
"""

import copy
import math

import grain
import numpy as np

from s5scale.data.bad_data import DataError


class PackRowsIterDataset(grain.IterDataset):
  """{"tokens", "token_bytes": (n,) int32} documents -> fixed-length rows (module docstring).

  across_documents=True concatenates documents into one stream (packed text: a row may hold
  the end of one document and the start of the next). False cuts each document into its own
  rows, padding the last one (audio evaluation windows: a row never mixes two clips).
  """

  def __init__(self, parent, row_length: int, pad_id: int, across_documents: bool):
    super().__init__(parent)
    self._row_length, self._pad_id, self._across = row_length, pad_id, across_documents

  def __iter__(self):
    return _PackRowsIterator(self._parent.__iter__(), self._row_length, self._pad_id,
                             self._across)


class _PackRowsIterator(grain.DatasetIterator):
  """Keeps the documents the next row touches, each with the parent state from before it."""

  def __init__(self, parent, row_length, pad_id, across_documents):
    super().__init__(parent)
    self._row_length, self._pad_id, self._across = row_length, pad_id, across_documents
    self._documents = []      # [(parent state before this document, {key: (n,) array})]
    self._offset = 0          # where the next row starts inside self._documents[0]

  def _fetch(self) -> bool:
    # A copy: some grain iterators hand out their live state dict, which the next call mutates.
    state_before = copy.deepcopy(self._parent.get_state())
    try:
      document = next(self._parent)
    except StopIteration:
      return False
    self._documents.append((state_before, document))
    return True

  def _length(self, position: int) -> int:
    return len(self._documents[position][1]["tokens"])

  def _available(self) -> int:
    """Tokens from the row start to the end of what the row may use, fetching as needed."""
    if not self._across:
      while not self._documents:
        if not self._fetch():
          return 0
      return self._length(0) - self._offset
    available = sum(self._length(i) for i in range(len(self._documents))) - self._offset
    while available < self._row_length and self._fetch():
      available += self._length(-1)
    return available

  def __next__(self):
    while (available := self._available()) < 2:   # a row needs one input and one target
      if self._across or not self._documents:
        raise StopIteration
      self._documents.pop(0)
      self._offset = 0
    row = {"tokens": np.full(self._row_length, self._pad_id, np.int32),
           "token_bytes": np.zeros(self._row_length, np.int32),
           "is_doc_start": np.zeros(self._row_length, bool),
           "valid": np.zeros(self._row_length, bool)}
    filled, offset = 0, self._offset
    for _, document in self._documents if self._across else self._documents[:1]:
      end = min(len(document["tokens"]), offset + self._row_length - filled)
      size = end - offset
      row["tokens"][filled:filled + size] = document["tokens"][offset:end]
      row["token_bytes"][filled:filled + size] = document["token_bytes"][offset:end]
      row["valid"][filled:filled + size] = True
      row["is_doc_start"][filled] = offset == 0
      filled += size
      offset = 0
      if filled == self._row_length:
        break
    self._advance(min(available, self._row_length) - 1)
    return row

  def _advance(self, stride: int):
    """Moves the row start by `stride` tokens, dropping documents left fully behind."""
    self._offset += stride
    if not self._across:
      if self._offset + 1 >= self._length(0):
        self._documents.pop(0)
        self._offset = 0
      return
    while self._documents and self._offset >= self._length(0):
      self._offset -= self._length(0)
      self._documents.pop(0)

  def get_state(self):
    parent_state = self._documents[0][0] if self._documents else self._parent.get_state()
    return {"parent": parent_state, "offset": self._offset}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._documents = []
    self._offset = int(state["offset"])


class ShardRowsIterDataset(grain.IterDataset):
  """Keeps rows r with r % count == index, then pads with `padding_row` to a multiple of `multiple`.

  Evaluation gives every process the same global row stream and count = process_count: the
  processes get disjoint rows whose union is the split, and all of them end after the same
  number of batches, ceil(ceil(R / count) / multiple), so a multi-host eval loop stays in step.
  With count=1 it only pads the final partial batch of a finite stream.
  """

  def __init__(self, parent, index: int, count: int, multiple: int, padding_row: dict,
               description: str):
    super().__init__(parent)
    self._args = (index, count, multiple, padding_row, description)

  def __iter__(self):
    return _ShardRowsIterator(self._parent.__iter__(), *self._args)


class _ShardRowsIterator(grain.DatasetIterator):

  def __init__(self, parent, index, count, multiple, padding_row, description):
    super().__init__(parent)
    self._index, self._count, self._multiple = index, count, multiple
    self._padding_row, self._description = padding_row, description
    self._rows_seen = 0       # rows of the global stream read so far
    self._emitted = 0         # rows (real or padding) this process returned
    self._exhausted = False

  def __next__(self):
    while not self._exhausted:
      try:
        row = next(self._parent)
      except StopIteration:
        self._exhausted = True
        break
      self._rows_seen += 1
      if (self._rows_seen - 1) % self._count == self._index:
        self._emitted += 1
        return row
    if self._rows_seen == 0:
      raise DataError(f"no usable examples in {self._description}")
    per_process = math.ceil(self._rows_seen / self._count)
    if self._emitted < math.ceil(per_process / self._multiple) * self._multiple:
      self._emitted += 1
      return {key: value.copy() for key, value in self._padding_row.items()}
    raise StopIteration

  def get_state(self):
    return {"parent": self._parent.get_state(), "rows_seen": self._rows_seen,
            "emitted": self._emitted, "exhausted": self._exhausted}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._rows_seen, self._emitted = int(state["rows_seen"]), int(state["emitted"])
    self._exhausted = bool(state["exhausted"])
