"""Decode, resample and normalize an audio source once, into ArrayRecord shards.

  python tools/prepare_audio.py --source=/data/speech_commands --output=/data/sc_16k \
      --sample_rate=16000 --num_shards=64 --num_workers=8

Each record is a 16-bit mono WAV at --sample_rate, peak-normalized; `<shard>.json` beside each
shard lists the record ids (paths relative to the source root) and labels (first folder), so
training on the shards (data.source=/data/sc_16k) sees the same held-out split and classes as
training on the raw folder. Bad files are skipped and named in the log. Progress and ETA are
logged; re-running the same command resumes, skipping shards that are already complete.
--chunk_seconds=N cuts long files (podcasts, audiobooks) into N-second records, ids
"<file>#00000", "<file>#00001", ...; all chunks of a file share its held-out split, and the
file is normalized once, so the stored chunks keep their relative loudness. Fresh-window
training loads each chunk as a clip and normalizes it again on its own; data.carry_state=True
streams a file's chunks in order as one recording at the file's level (docs/data.md). (A file
is decoded whole in one worker: memory grows with its length.)
Speech Commands' testing_list.txt / validation_list.txt are copied beside the shards, so the
shards keep the published split. Exit 2: bad flags or a source with no audio.
"""

import functools
import os
import sys

from absl import app
from absl import flags
from absl import logging
from etils import epath

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from s5scale.data import bad_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from s5scale.data import shards  # pylint: disable=g-import-not-at-top,wrong-import-position
from s5scale.data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position

_SOURCE = flags.DEFINE_string("source", None, "Directory or glob of WAV/FLAC/OGG files "
                              "('' = the embedded procedural corpus).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output directory for the shards.", required=True)
_SAMPLE_RATE = flags.DEFINE_integer("sample_rate", 16000, "Target sample rate (Hz).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 0, "Number of shards (0: one per 1024 clips).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Decoding processes.")
_CHUNK_SECONDS = flags.DEFINE_float("chunk_seconds", 0.0, "Cut files longer than this into "
                                    "records of this length (0: one record per file).")


def main(argv):
  del argv
  if (_SAMPLE_RATE.value <= 0 or _NUM_SHARDS.value < 0 or _NUM_WORKERS.value < 1
      or _CHUNK_SECONDS.value < 0):
    logging.error("--sample_rate and --num_workers must be positive, --num_shards and "
                  "--chunk_seconds >= 0")
    sys.exit(2)
  try:
    source = sources.open_source("audio", _SOURCE.value, _SAMPLE_RATE.value)
  except bad_data.DataError as error:
    logging.error("%s", error)
    sys.exit(2)
  num_shards = _NUM_SHARDS.value or max(1, -(-len(source) // 1024))
  encode = functools.partial(shards.audio_record, sample_rate=_SAMPLE_RATE.value,
                             chunk_seconds=_CHUNK_SECONDS.value)
  summary = shards.write_shards(source, encode, _OUTPUT.value, num_shards, _NUM_WORKERS.value)
  for name in (sources.TESTING_LIST, sources.VALIDATION_LIST):
    if _SOURCE.value and (listing := epath.Path(_SOURCE.value, name)).exists():
      # Read and written whole: epath's copy cannot go from a local file to gs:// or back.
      epath.Path(_OUTPUT.value, name).write_bytes(listing.read_bytes())
  logging.info("done: %s -> %s", summary, _OUTPUT.value)
  print(f"wrote {summary['written']} clips to {num_shards} shards in {_OUTPUT.value} "
        f"({summary['skipped']} bad files skipped, {summary['shards_reused']} shards reused)")


if __name__ == "__main__":
  app.run(main)
