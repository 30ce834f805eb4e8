"""Text files as items: whole files, lines of .jsonl files, rows of .parquet files.

sources.py lists the files; this module indexes them into one TextSource, whose items a
worker can read on its own (a byte offset for a JSON line, a row number for a Parquet row).
Parquet is read with pyarrow when it is installed (`pip install pyarrow`).
"""

import functools
import json
import os

from etils import epath
import numpy as np

from s5scale.data import bad_data
from s5scale.data.bad_data import DataError

JSONL_EXTENSION = ".jsonl"
PARQUET_EXTENSION = ".parquet"   # one document per row


class TextSource:
  """Text files: one document per file, or per line of .jsonl files / row of .parquet files
  (data.jsonl_field holds the text in both).

  offsets[i] is the byte offset of item i's JSON line, the row number of its Parquet row, or
  -1 when the item is a whole file.
  """

  def __init__(self, root: str, relpaths: list[str], file_index, offsets, line_numbers,
               description: str):
    self.root, self.relpaths, self.description = root, relpaths, description
    self.file_index, self.offsets = file_index, offsets
    self.ids = [relpaths[f] if n < 0 else f"{relpaths[f]}:{n}"
                for f, n in zip(file_index, line_numbers)]
    self.labels = [""] * len(self.ids)

  def __len__(self):
    return len(self.ids)

  def is_json_line(self, index: int) -> bool:
    return bool(self.offsets[index] >= 0)

  def read(self, index: int):
    path = epath.Path(self.root, self.relpaths[self.file_index[index]])
    if not self.is_json_line(index):
      return path.read_bytes()
    if path.name.lower().endswith(PARQUET_EXTENSION):
      return _parquet_row_as_json(os.fspath(path), int(self.offsets[index]))
    with path.open("rb") as stream:
      stream.seek(int(self.offsets[index]))
      return stream.readline()

  def name(self, index: int) -> str:
    return os.fspath(epath.Path(self.root, self.ids[index]))


@functools.lru_cache(maxsize=2)
def _parquet_row_group(path: str, row_group: int):
  """One row group as Python rows; cached because shuffled reads often revisit the last one.
  (Parquet reads whole row groups: for heavy random access, convert with prepare_text.py.)"""
  import pyarrow.parquet  # pylint: disable=g-import-not-at-top
  with epath.Path(path).open("rb") as stream:
    return pyarrow.parquet.ParquetFile(stream).read_row_group(row_group).to_pylist()


@functools.lru_cache(maxsize=64)
def _parquet_row_group_ends(path: str) -> np.ndarray:
  import pyarrow.parquet  # pylint: disable=g-import-not-at-top
  with epath.Path(path).open("rb") as stream:
    metadata = pyarrow.parquet.ParquetFile(stream).metadata
  return np.cumsum([metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])


def _parquet_row_as_json(path: str, row: int) -> bytes:
  """Row `row` of a Parquet file as a JSON line, so the text pipeline reads it like .jsonl."""
  ends = _parquet_row_group_ends(path)
  group = int(np.searchsorted(ends, row, side="right"))
  first = int(ends[group - 1]) if group else 0
  record = _parquet_row_group(path, group)[row - first]
  return json.dumps(record, default=str, ensure_ascii=False).encode("utf-8")


def is_json_line(source, index: int) -> bool:
  """Whether item `index` is a JSON Lines record (its text sits in data.jsonl_field)."""
  return isinstance(source, TextSource) and source.is_json_line(index)


def _parquet_num_rows(path: str, description: str) -> int:
  try:
    import pyarrow.parquet  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(f"{description} holds Parquet files ({path}); reading them needs pyarrow "
                    "(pip install pyarrow)") from None
  try:
    with epath.Path(path).open("rb") as stream:
      return pyarrow.parquet.ParquetFile(stream).metadata.num_rows
  except (OSError, pyarrow.lib.ArrowException) as error:
    bad_data.record(bad_data.marker("bad_files", path, f"not a readable Parquet file: {error}"))
    return 0


def index_text(root: str, relpaths: list[str], description: str) -> TextSource:
  """One item per file, except .jsonl files: the byte offset of every non-blank line, so
  workers can seek straight to a document."""
  file_index, offsets, line_numbers = [], [], []
  for number, relpath in enumerate(relpaths):
    if relpath.lower().endswith(PARQUET_EXTENSION):
      num_rows = _parquet_num_rows(os.fspath(epath.Path(root, relpath)), description)
      file_index += [number] * num_rows
      offsets += range(num_rows)
      line_numbers += range(num_rows)
      continue
    if not relpath.lower().endswith(JSONL_EXTENSION):
      file_index.append(number)
      offsets.append(-1)
      line_numbers.append(-1)
      continue
    offset = 0
    for line_number, line in enumerate(epath.Path(root, relpath).read_bytes().split(b"\n")):
      if line.strip():
        file_index.append(number)
        offsets.append(offset)
        line_numbers.append(line_number + 1)
      offset += len(line) + 1
  return TextSource(root, relpaths, np.asarray(file_index, np.int32),
                    np.asarray(offsets, np.int64), line_numbers, description)
