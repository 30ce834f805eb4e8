"""Where items come from: a random-access list of (id, label, raw payload) for any data.source.

data.source may be
  ""                      the embedded default corpus (Python stdlib .py files / procedural audio);
  a file                  one text or audio file, whatever its extension (.jsonl: one document
                          per line, .parquet: one per row), or one .array_record shard;
  a directory             searched recursively for audio (.wav .flac .ogg) or text (every
                          non-hidden file, or those ending in data.text_extensions; a .jsonl
                          file gives one document per line, a .parquet file one per row);
                          if it holds *.array_record
                          shards, those are read instead;
  a glob                  e.g. "/data/**/*.flac", "gs://bucket/text/*.jsonl", "out/*.array_record".
Paths go through etils.epath, so gs:// and other cloud paths work where their filesystem package
is installed. Listing happens once in the main process; reading happens in grain workers, so a
source holds only picklable, compact state (path strings, offsets).

Item ids are paths relative to the source root (JSON Lines: "path:line"), or the ids stored by
tools/prepare_*.py next to each shard, so the held-out split is the same for raw and prepared data.
An audio directory holding Speech Commands' testing_list.txt brings its own split: every opened
source has `listed_split`, a ListedSplit or None (see split.py).
"""

import functools
import glob as glob_lib
import json
import logging
import os
import sysconfig
from typing import NamedTuple

from etils import epath
import numpy as np

from s5scale import storage
from s5scale.data import procedural_audio
from s5scale.data.bad_data import DataError
from s5scale.data.text_files import index_text
from s5scale.data.text_files import is_json_line  # pylint: disable=unused-import  # re-exported

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
ARRAY_RECORD_EXTENSION = ".array_record"
SIDECAR_SUFFIX = ".json"  # shard.array_record.json: {"ids": [...], "labels": [...]}
TESTING_LIST, VALIDATION_LIST = "testing_list.txt", "validation_list.txt"

_LOG = logging.getLogger("s5scale.data")


class ListedSplit(NamedTuple):
  """Speech Commands' published split, as sorted int64 item indices.

  The validation list is SC's model-selection set. We report accuracy on the test list, so the
  validation files are in neither split: training then uses exactly SC's train set, and the
  held-out numbers compare with published test accuracies.
  """
  heldout: np.ndarray     # the items named in testing_list.txt
  excluded: np.ndarray    # the items named in validation_list.txt (and not in the test list)


class FileSource:
  """One item per file; payload = the file's bytes; label = the first folder under the root."""

  def __init__(self, root: str, relpaths: list[str], description: str):
    self.root, self.relpaths, self.description = root, relpaths, description
    self.ids = relpaths
    self.labels = [path.split("/")[0] if "/" in path else "" for path in relpaths]

  def __len__(self):
    return len(self.relpaths)

  def read(self, index: int):
    return epath.Path(self.root, self.relpaths[index]).read_bytes()

  def open(self, index: int):
    """A seekable binary file object (long audio is cropped by seeking, not read whole)."""
    return epath.Path(self.root, self.relpaths[index]).open("rb")

  def name(self, index: int) -> str:
    return os.fspath(epath.Path(self.root, self.relpaths[index]))


class ArrayRecordSource:
  """Records of ArrayRecord shards (written by tools/prepare_*.py, or any with raw payloads)."""

  def __init__(self, paths: list[str], shard_sizes: list[int], ids: list[str], labels: list[str],
               description: str):
    self.paths, self.ids, self.labels, self.description = paths, ids, labels, description
    self.shard_ends = np.cumsum(shard_sizes)

  def __len__(self):
    return len(self.ids)

  @functools.cached_property
  def _records(self):
    # Opened lazily so the object pickles to grain workers as a list of paths.
    import grain  # pylint: disable=g-import-not-at-top
    return grain.sources.ArrayRecordDataSource(self.paths)

  def read(self, index: int):
    return self._records[index]

  def name(self, index: int) -> str:
    shard = int(np.searchsorted(self.shard_ends, index, side="right"))
    first = int(self.shard_ends[shard - 1]) if shard else 0
    return f"{self.paths[shard]}[{index - first}] ({self.ids[index]})"

  def __getstate__(self):
    state = self.__dict__.copy()
    state.pop("_records", None)
    return state


class ProceduralAudioSource:
  """The embedded synthetic audio corpus; payload = a float32 waveform already at the rate."""

  def __init__(self, sample_rate: int):
    self.sample_rate = sample_rate
    self.description = "the embedded procedural audio corpus"
    indices = range(procedural_audio.NUM_CLIPS)
    self.ids = [procedural_audio.clip_id(i) for i in indices]
    self.labels = [procedural_audio.clip_category(i) for i in indices]

  def __len__(self):
    return len(self.ids)

  def read(self, index: int):
    return procedural_audio.generate_clip(index, self.sample_rate)

  def name(self, index: int) -> str:
    return self.ids[index]


def _has_glob(path: str) -> bool:
  return any(character in path for character in "*?[")


def _split_glob(source: str) -> tuple[str, str]:
  """("/data/audio", "**/*.wav") for "/data/audio/**/*.wav": the fixed root and the pattern."""
  parts = source.split("/")
  first_glob = next(i for i, part in enumerate(parts) if _has_glob(part))
  return "/".join(parts[:first_glob]) or ".", "/".join(parts[first_glob:])


def _is_cloud(path: str) -> bool:
  return "://" in path


def _walk(root: str, skip_hidden: bool):
  """Every file under root, recursively (os.walk locally; epath listing for cloud paths).

  skip_hidden leaves out names starting with "." (.git, .DS_Store, editor swap files): when a
  directory means "every file", those are tool state, not the corpus.
  """
  def visible(name):
    return not (skip_hidden and name.startswith("."))
  if not _is_cloud(root):
    for directory, subdirectories, files in os.walk(root):
      subdirectories[:] = sorted(d for d in subdirectories if visible(d))
      yield from (os.path.join(directory, name) for name in files if visible(name))
    return
  for path in epath.Path(root).iterdir():
    if not visible(path.name):
      continue
    if path.is_dir():
      yield from _walk(os.fspath(path), skip_hidden)
    else:
      yield os.fspath(path)


def _list_files(source: str, extensions, key: str) -> tuple[str, list[str]]:
  """(root, sorted paths relative to root) for a file, a directory or a glob (all matches).

  A file named on its own is taken whatever its extension, as a glob's matches are (its root is
  its folder, so its id is its name). A directory keeps the files whose lower-cased extension is
  in `extensions`, or every non-hidden regular file when `extensions` is None.

  Globs may use ** locally; cloud globs are single-level (etils.epath refuses ** there, since it
  would mean one request per folder).
  """
  if _has_glob(source):
    root, pattern = _split_glob(source)
    if _is_cloud(source):
      matches = [os.fspath(path) for path in epath.Path(root).glob(pattern)]
    else:
      matches = [path for path in glob_lib.glob(source, recursive=True) if os.path.isfile(path)]
  else:
    root = source
    if epath.Path(source).is_file():
      return os.fspath(epath.Path(source).parent), [epath.Path(source).name]
    if not epath.Path(root).is_dir():
      raise DataError(f"{key} {source!r} is not a file, directory, glob or .array_record shard")
    matches = [path for path in _walk(root, skip_hidden=extensions is None)
               if extensions is None or os.path.splitext(path)[1].lower() in extensions]
  prefix = root.rstrip("/") + "/"
  relpaths = sorted(os.path.relpath(path, root).replace(os.sep, "/") if not _is_cloud(root)
                    else path[len(prefix):] for path in matches)
  return root, relpaths


def _array_record_paths(source: str) -> list[str] | None:
  """Shard paths when the source names ArrayRecord data, else None."""
  if source.endswith(ARRAY_RECORD_EXTENSION):
    if not _has_glob(source):
      return [source]
    root, relpaths = _list_files(source, (), "data.source")
    return [os.fspath(epath.Path(root, relpath)) for relpath in relpaths]
  if not _has_glob(source) and epath.Path(source).is_dir():
    return sorted(os.fspath(p) for p in epath.Path(source).glob("*" + ARRAY_RECORD_EXTENSION)
                  ) or None
  return None


def _open_array_records(paths: list[str], description: str) -> ArrayRecordSource:
  import grain  # pylint: disable=g-import-not-at-top
  ids, labels, shard_sizes, local_paths = [], [], [], []
  for path in paths:
    local_paths.append(storage.local_copy(path))  # ArrayRecord reads local files only
    num_records = len(grain.sources.ArrayRecordDataSource([local_paths[-1]]))
    shard_sizes.append(num_records)
    sidecar = epath.Path(path + SIDECAR_SUFFIX)
    if sidecar.exists():
      meta = json.loads(sidecar.read_text())
      if len(meta["ids"]) != num_records:
        raise DataError(f"{sidecar} lists {len(meta['ids'])} ids but {path} has {num_records} "
                        "records; re-run the prepare tool")
      ids += meta["ids"]
      labels += meta.get("labels") or [""] * num_records
    else:
      ids += [f"{os.path.basename(path)}:{i}" for i in range(num_records)]
      labels += [""] * num_records
  return ArrayRecordSource(local_paths, shard_sizes, ids, labels, description)


def _read_listed_split(root: str, ids: list[str], description: str) -> ListedSplit | None:
  """The split of root's testing_list.txt / validation_list.txt (relative paths, one a line)."""
  directory = epath.Path(root)
  if not (directory / TESTING_LIST).exists():
    return None
  index_of = {item_id: index for index, item_id in enumerate(ids)}
  listed, missing = {}, 0
  for name in (TESTING_LIST, VALIDATION_LIST):
    list_file = directory / name
    lines = list_file.read_text().splitlines() if list_file.exists() else []
    entries = [line.strip() for line in lines if line.strip()]
    missing += sum(entry not in index_of for entry in entries)
    listed[name] = np.unique(np.asarray([index_of[e] for e in entries if e in index_of], np.int64))
  heldout = listed[TESTING_LIST]
  excluded = np.setdiff1d(listed[VALIDATION_LIST], heldout)
  _LOG.info("%s: held-out split = the %d files of %s, %d files of %s in neither split; "
            "data.heldout_fraction is ignored", description, heldout.size, TESTING_LIST,
            excluded.size, VALIDATION_LIST)
  if missing:
    _LOG.warning("%s: %d paths in %s / %s are not among its audio files; ignored", description,
                 missing, TESTING_LIST, VALIDATION_LIST)
  return ListedSplit(heldout, excluded)


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def _stdlib_source() -> FileSource:
  """Every .py file of this Python's standard library, excluding installed third-party packages."""
  root = stdlib_root()
  relpaths = []
  for directory, subdirectories, files in os.walk(root):
    subdirectories[:] = sorted(d for d in subdirectories
                               if d not in ("site-packages", "dist-packages", "__pycache__"))
    relative = os.path.relpath(directory, root)
    relpaths += [os.path.normpath(os.path.join(relative, name)).replace(os.sep, "/")
                 for name in files if name.endswith(".py")]
  return FileSource(root, sorted(relpaths), f"the Python standard library at {root}")


def parse_extensions(text_extensions: str):
  """data.text_extensions ("" or ".py,.md,txt") -> None (every file) or a tuple (".py", ...)."""
  names = [name.strip().lower() for name in text_extensions.split(",") if name.strip()]
  return tuple(name if name.startswith(".") else "." + name for name in names) or None


def _no_files_message(kind: str, source: str, extensions, key: str) -> str:
  looked_for = ("every non-hidden file" if extensions is None
                else "files ending " + ", ".join(extensions))
  example = "**/*" + (extensions[0] if extensions else ".txt")
  hint = (f"; to read other files, pass a glob such as {key}="
          f"'{source.rstrip('/')}/{example}'")
  if kind == "text" and extensions is not None:
    hint += " or set data.text_extensions='' (every file)"
  return f"{key} {source!r} has no {kind} files (looked for {looked_for}){hint}"


@functools.lru_cache(maxsize=8)
def open_source(kind: str, source: str, sample_rate: int, text_extensions: str = "",
                key: str = "data.source"):
  """The item list for data.kind / data.source. Raises DataError when nothing matches.

  text_extensions: data.text_extensions; "" lets a text directory take every regular file.
  key: the config key that names `source`, for messages ("data.heldout_source" reads no
  testing_list.txt: all of it is held out).
  """
  if kind not in ("text", "audio"):
    raise ValueError(f"data.kind must be 'text' or 'audio', got {kind!r}")
  if not source:
    opened = _stdlib_source() if kind == "text" else ProceduralAudioSource(sample_rate)
  elif not _has_glob(source) and not epath.Path(source).exists():
    raise DataError(f"{key} {source!r} does not exist")
  elif (shards := _array_record_paths(source)) is not None:
    if not shards:
      raise DataError(f"{key} {source!r}: no ArrayRecord shards match")
    opened = _open_array_records(shards, f"{key} {source!r}")
  else:
    extensions = AUDIO_EXTENSIONS if kind == "audio" else parse_extensions(text_extensions)
    root, relpaths = _list_files(source, extensions, key)
    description = f"{key} {source!r}"
    if not relpaths:
      raise DataError(_no_files_message(kind, source, extensions, key))
    if kind == "text":
      opened = index_text(root, relpaths, description)
    else:
      opened = FileSource(root, relpaths, description)
  if len(opened) == 0:
    raise DataError(f"{opened.description} has no items")
  is_directory = bool(source) and not _has_glob(source) and epath.Path(source).is_dir()
  opened.listed_split = (_read_listed_split(source, opened.ids, opened.description)
                         if kind == "audio" and is_directory and key == "data.source" else None)
  return opened
