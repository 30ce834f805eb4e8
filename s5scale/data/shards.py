"""Writing ArrayRecord shards once (tools/prepare_*.py): parallel encode, progress with ETA, resume.

Shard k of N holds a contiguous run of the sorted items. A shard is complete when its sidecar
`<shard>.json` exists: {"ids": [...], "labels": [...], "skipped": [...]}; the sidecar is written
after the shard file is closed and renamed into place, so an interrupted run redoes only the
shard it was writing. The pipeline reads the ids from the sidecar, so the held-out split of
prepared shards equals that of the raw files.
"""

import concurrent.futures
import json
import logging
import math
import multiprocessing
import os
import tempfile
import time

from array_record.python import array_record_module
from etils import epath

from s5scale import storage
from s5scale.data import audio
from s5scale.data import bad_data
from s5scale.data import sources
from s5scale.data import text
from s5scale.data.sources import SIDECAR_SUFFIX

_LOG = logging.getLogger("s5scale.data")


def shard_path(output: str, index: int, count: int) -> str:
  return os.fspath(epath.Path(output, f"shard-{index:05d}-of-{count:05d}.array_record"))


def shard_ranges(num_items: int, num_shards: int) -> list[range]:
  """Contiguous, near-equal item ranges, one per shard."""
  return [range(num_items * k // num_shards, num_items * (k + 1) // num_shards)
          for k in range(num_shards)]


class _Progress:
  """Logs items done, rate and ETA at most every `interval_s` seconds."""

  def __init__(self, total: int, interval_s: float = 5.0):
    self._total, self._interval_s = total, interval_s
    self._start = self._last = time.monotonic()
    self.done = 0

  def advance(self, count: int = 1, force: bool = False):
    self.done += count
    now = time.monotonic()
    if force or now - self._last >= self._interval_s:
      self._last = now
      rate = self.done / max(now - self._start, 1e-9)
      remaining = (self._total - self.done) / rate if rate else float("inf")
      _LOG.info("%d/%d items (%.1f%%), %.1f items/s, ETA %s", self.done, self._total,
                   100 * self.done / max(self._total, 1), rate, _format_seconds(remaining))


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


CHUNK_MARK = "#"   # chunk k of item "a/b.flac" has id "a/b.flac#0000k" (split.py keys it by file)


def audio_record(source, index: int, sample_rate: int, chunk_seconds: float = 0.0):
  """Item -> 16-bit WAV bytes, mono, resampled to sample_rate and peak-normalized; or a marker.

  chunk_seconds > 0 cuts a longer file into a list of consecutive chunks of that length (the
  whole file normalized once, so the stored chunks keep their relative level; the fresh-window
  loader re-normalizes each chunk, carried-state lanes join them at the file's level); a final
  piece shorter than a quarter chunk is dropped.
  """
  try:
    payload = source.read(index)
    if isinstance(payload, bytes):
      waveform = audio.load_waveform(payload, sample_rate)
    else:                                    # the procedural corpus yields waveforms
      waveform = payload
  except (OSError, audio.UnreadableAudio) as error:
    return bad_data.marker("bad_files", source.name(index), str(error))
  chunk = int(chunk_seconds * sample_rate)
  if chunk <= 0 or waveform.size <= chunk:
    return audio.encode_wav_bytes(waveform, sample_rate)
  starts = [start for start in range(0, waveform.size, chunk)
            if waveform.size - start >= min(chunk, max(1, chunk // 4))]
  return [audio.encode_wav_bytes(waveform[start:start + chunk], sample_rate) for start in starts]


def text_record(source, index: int, jsonl_field: str = "text"):
  """Item -> the document's UTF-8 bytes (tokenized later: the tokenizer may change), or a marker."""
  try:
    payload = source.read(index)
  except OSError as error:
    return bad_data.marker("bad_files", source.name(index), f"unreadable: {error}")
  document = text.parse_document(payload, source.name(index),
                                 sources.is_json_line(source, index), jsonl_field)
  return document if bad_data.is_marker(document) else document.encode("utf-8")


_worker_job = None


def _start_worker(encode, source):
  global _worker_job
  _worker_job = (encode, source)


def _encode_in_worker(index):
  encode, source = _worker_job
  return encode(source, index)


def _local_shard_file(path: str) -> str:
  """Where ArrayRecord's writer (local files only) writes shard `path` before it is published."""
  if not storage.is_cloud(path):
    return path + ".tmp"
  descriptor, local = tempfile.mkstemp(suffix=".array_record", prefix="s5scale-shard-")
  os.close(descriptor)
  return local


def _publish_shard(local: str, path: str) -> None:
  """Moves the finished shard to its name (locally a rename; to the cloud one upload)."""
  if not storage.is_cloud(path):
    epath.Path(local).replace(path)
    return
  storage.upload(local, path)
  os.remove(local)


def write_shards(source, encode, output: str, num_shards: int, num_workers: int) -> dict:
  """Encodes every item of `source` with `encode(source, index) -> bytes | [bytes] | marker`
  into shards (a list: one record per chunk, ids suffixed #00000, #00001, ...).

  `encode` must be picklable (a module-level function or functools.partial of one): it runs in
  `num_workers` processes, which receive the source once, at start-up.

  Returns {"written": records, "skipped": bad items, "shards_reused": already complete shards}.
  """
  storage.makedirs(output)
  ranges = shard_ranges(len(source), num_shards)
  pending = [k for k in range(num_shards)
             if not epath.Path(shard_path(output, k, num_shards) + SIDECAR_SUFFIX).exists()]
  summary = {"written": 0, "skipped": 0, "shards_reused": num_shards - len(pending)}
  if summary["shards_reused"]:
    _LOG.info("resuming: %d of %d shards already complete in %s", summary["shards_reused"],
                 num_shards, output)
  progress = _Progress(sum(len(ranges[k]) for k in pending))
  executor = None
  if num_workers > 1:
    # gcsfs keeps an event loop on a thread that a forked child cannot use ("not fork-safe"), so
    # cloud paths get freshly started workers; local ones keep the cheaper fork.
    cloud = storage.is_cloud(output) or any(
        storage.is_cloud(path) for path in getattr(source, "paths", [getattr(source, "root", "")]))
    executor = concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context("spawn") if cloud else None,
        initializer=_start_worker, initargs=(encode, source))
  try:
    for k in pending:
      path = shard_path(output, k, num_shards)
      items = ranges[k]
      encoded = (executor.map(_encode_in_worker, items, chunksize=8) if executor
                 else (encode(source, index) for index in items))
      local = _local_shard_file(path)
      writer = array_record_module.ArrayRecordWriter(local, "group_size:1")
      ids, labels, skipped = [], [], []
      for index, record in zip(items, encoded):
        if bad_data.is_marker(record):
          bad_data.record(record)
          skipped.append(record[bad_data.BAD_KEY][1])
        elif isinstance(record, list):        # chunks of one long item
          for number, chunk in enumerate(record):
            writer.write(chunk)
            ids.append(f"{source.ids[index]}{CHUNK_MARK}{number:05d}")
            labels.append(source.labels[index])
        else:
          writer.write(record)
          ids.append(source.ids[index])
          labels.append(source.labels[index])
        progress.advance()
      writer.close()
      _publish_shard(local, path)
      sidecar = epath.Path(path + SIDECAR_SUFFIX + ".tmp")
      sidecar.write_text(json.dumps({"ids": ids, "labels": labels, "skipped": skipped}))
      sidecar.replace(path + SIDECAR_SUFFIX)
      summary["written"] += len(ids)
      summary["skipped"] += len(skipped)
  finally:
    if executor:
      executor.shutdown()
  progress.advance(0, force=True)
  return summary
