"""One path layer for workdirs and data sources: local folders and gs:// (or any fsspec URL) alike.

Everything goes through etils.epath, the layer orbax itself uses, so a workdir on gs:// is read
and written the same way as a local one. gs:// needs the `gcs` extra (gcsfs).

Object stores cannot append: an append-only record (metrics.jsonl) on a cloud path is rewritten
whole and replaced in one upload, which GCS makes atomic, so a reader sees the old or the new file,
never half of one. Local files keep appending.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile

from etils import epath

try:  # Another process (the trainer) adds checkpoints while evaluate --watch lists them: gcsfs
  # would otherwise serve its first listing of a folder forever.
  import fsspec.config
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
except ImportError:  # fsspec comes with etils[epath]; without it only local paths work anyway
  pass

COPY_CHUNK_BYTES = 16 << 20


def is_cloud(path) -> bool:
  return "://" in os.fspath(path)


def path(*parts) -> epath.Path:
  return epath.Path(*parts)


def join(*parts) -> str:
  """os.path.join for local paths and URLs alike (a gs:// URL keeps its two slashes)."""
  return os.fspath(epath.Path(*parts))


def makedirs(directory) -> None:
  """A no-op on object stores, where folders are only name prefixes."""
  if not is_cloud(directory):
    epath.Path(directory).mkdir(parents=True, exist_ok=True)


def write_text(file_path, text: str) -> None:
  """Writes the whole file; its folder is created first where folders exist."""
  makedirs(epath.Path(file_path).parent)
  epath.Path(file_path).write_text(text)


def write_json(file_path, payload: dict) -> None:
  write_text(file_path, json.dumps(payload, indent=2, sort_keys=True))


def replace_text(file_path, text: str) -> None:
  """Writes the whole file so that a reader sees the old text or the new, never part of one:
  locally a temporary file renamed over it; on object stores one upload, which is atomic there
  already (and a rename would be a copy and a delete)."""
  target = epath.Path(file_path)
  if is_cloud(file_path):
    target.write_text(text)
    return
  makedirs(target.parent)
  temporary = target.parent / f".{target.name}.tmp"
  temporary.write_text(text)
  temporary.replace(target)


def read_json(file_path) -> dict:
  return json.loads(epath.Path(file_path).read_text())


def append_jsonl(file_path, record: dict) -> None:
  """Adds one JSON line: appended locally, rewritten whole on object stores."""
  line = json.dumps(record) + "\n"
  target = epath.Path(file_path)
  if not is_cloud(file_path):
    makedirs(target.parent)
    with target.open("a") as f:
      f.write(line)
    return
  existing = target.read_text() if target.exists() else ""
  if existing and not existing.endswith("\n"):
    existing += "\n"
  target.write_text(existing + line)


def read_jsonl(file_path) -> list[dict]:
  """[] when the file does not exist yet."""
  target = epath.Path(file_path)
  if not target.exists():
    return []
  return [json.loads(line) for line in target.read_text().splitlines() if line.strip()]


def write_wav(file_path, samples, sample_rate: int) -> None:
  """soundfile writes to a file object, so a WAV goes to any path epath can open."""
  import soundfile  # pylint: disable=g-import-not-at-top  (only the audio paths need it)
  makedirs(epath.Path(file_path).parent)
  with epath.Path(file_path).open("wb") as stream:
    soundfile.write(stream, samples, sample_rate, format="WAV")


def make_numbered_dir(parent, prefix: str) -> str:
  """Creates PARENT/PREFIX<N>, N one above the largest existing number (a deleted one's number is
  not reused), and returns it. Locally a concurrent caller that takes N first moves us on; on an
  object store a folder is only a name prefix and exists once written to, so two callers that
  list at the same instant could pick the same N."""
  parent_path = epath.Path(parent)
  makedirs(parent_path)
  pattern = re.compile(re.escape(prefix) + r"(\d+)$")
  existing = [p.name for p in parent_path.iterdir()] if parent_path.exists() else []
  number = max((int(m.group(1)) for m in map(pattern.match, existing) if m), default=0) + 1
  while True:
    candidate = parent_path / f"{prefix}{number}"
    if is_cloud(parent):
      return os.fspath(candidate)
    try:
      os.mkdir(candidate)
      return os.fspath(candidate)
    except FileExistsError:
      number += 1


def cache_dir() -> str:
  """Local folder for copies of cloud objects that a library can only read from local disk."""
  return os.environ.get("S5SCALE_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "s5scale")


def local_copy(url) -> str:
  """A local file with url's bytes (a local path is returned as is).

  ArrayRecord's reader opens local files only. Shards are written once, so a copy is downloaded
  once per machine and fetched again only when the object's size changed. The download goes to a
  temporary name first: processes sharing the machine never read a partial copy.
  """
  if not is_cloud(url):
    return os.fspath(url)
  source = epath.Path(url)
  digest = hashlib.sha256(os.fspath(url).encode()).hexdigest()[:16]
  local = os.path.join(cache_dir(), "objects", f"{digest}-{source.name}")
  if os.path.exists(local) and os.path.getsize(local) == source.stat().length:
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  partial = tempfile.NamedTemporaryFile(dir=os.path.dirname(local), delete=False,
                                        prefix=f".{source.name}.")
  with partial, source.open("rb") as remote:
    shutil.copyfileobj(remote, partial, length=COPY_CHUNK_BYTES)
  os.replace(partial.name, local)
  return local


def upload(local_path: str, url) -> None:
  """Copies a local file to url (any path epath can write) in chunks."""
  with open(local_path, "rb") as source, epath.Path(url).open("wb") as target:
    shutil.copyfileobj(source, target, length=COPY_CHUNK_BYTES)
