"""Long audio files: train crops are seeked out of the file, not decoded whole; prepare_audio
cuts long files into chunked records.

Oracle: soundfile's full decode of the same file, sliced at the same offsets (the crop
function), or searched for each pipeline crop (the pipeline draws its own offsets).
"""

import io
import json
import subprocess
import sys

import grain
import numpy as np
import pytest
import soundfile

from s5scale import data
from s5scale import defaults
from s5scale.data import audio
from s5scale.data import split
from tests import helpers

RATE = 16000
MINUTES = 10


@pytest.fixture(scope="module")
def long_flac(tmp_path_factory):
  """A 10-minute stereo FLAC of noise and a slow chirp: no window repeats anywhere."""
  path = tmp_path_factory.mktemp("long") / "book.flac"
  rng = np.random.default_rng(0)
  time_s = np.arange(MINUTES * 60 * RATE) / RATE
  left = 0.4 * np.sin(2 * np.pi * (100 + 2 * time_s) * time_s) + 0.1 * rng.standard_normal(
      time_s.size)
  right = 0.2 * rng.standard_normal(time_s.size)
  soundfile.write(path, np.stack([left, right], axis=1), RATE, format="FLAC")
  full, rate = soundfile.read(path, dtype="float32", always_2d=True)
  assert rate == RATE and full.shape == (MINUTES * 60 * RATE, 2)
  return path, full.mean(axis=1, dtype=np.float32)


def test_crops_equal_a_full_decode_at_the_same_offsets(long_flac):
  path, full = long_flac
  length = 4001
  offsets = [0, 1, 4095, 4096, 1234567, full.size // 2 + 3, full.size - length]
  with open(path, "rb") as stream, audio.open_sound(stream) as sound:
    assert audio.num_samples_at(sound, RATE) == full.size
    for start in np.random.default_rng(1).permutation(offsets):   # seeks back and forth
      np.testing.assert_array_equal(audio.read_crop(sound, int(start), length, RATE),
                                    full[start:start + length], err_msg=str(start))


def test_crops_at_another_rate_match_a_full_resample_inside(long_flac):
  path, full = long_flac
  resampled = audio.resample(full[:RATE * 20], RATE, 8000)     # the first 20 s, decoded whole
  with open(path, "rb") as stream, audio.open_sound(stream) as sound:
    crop = audio.read_crop(sound, 40000, 2000, 8000)
  np.testing.assert_allclose(crop, resampled[40000:42000], atol=2e-3)


def _config(source, **overrides):
  config = defaults.base_config().data
  config.update(dict(kind="audio", source=str(source), batch_size=4, seq_len=256, seed=2,
                     heldout_fraction=0.0, num_workers=0, read_threads=2, quantization="mulaw",
                     bits=8))
  config.update(overrides)
  return config


def _find(codes: np.ndarray, window: np.ndarray) -> list[int]:
  """Every offset where `window` occurs in `codes`."""
  candidates = np.flatnonzero(codes[:codes.size - window.size + 1] == window[0])
  for position, value in enumerate(window[1:], start=1):
    candidates = candidates[codes[candidates + position] == value]
  return candidates.tolist()


def test_training_crops_of_a_long_file_are_slices_of_its_full_decode(long_flac):
  path, full = long_flac
  codes = audio.quantize(full, "mulaw", 8)      # long crops keep the file's level
  batches = [next(iterator) for iterator in [data.make_iterator(_config(path.parent), "train")]
             for _ in range(3)]
  starts = set()
  for batch in batches:
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      window = np.append(inputs, targets[-1])
      found = _find(codes, window)
      assert len(found) == 1, found
      starts.add(found[0])
  assert len(starts) == 12        # random offsets, all over the file


def test_a_long_file_cut_short_is_skipped_and_counted(long_flac, tmp_path, caplog):
  path, full = long_flac
  payload = path.read_bytes()
  (tmp_path / "cut.flac").write_bytes(payload[:len(payload) // 50])   # header says 10 minutes
  soundfile.write(tmp_path / "whole.flac", full[:RATE * 40], RATE, format="FLAC")
  iterator = data.make_iterator(_config(tmp_path, long_audio_seconds=30.0), "train")
  before = data.bad_data_counts()["bad_files"]
  with caplog.at_level("WARNING"):
    for _ in range(10):       # crops past the cut fail and are dropped; training goes on
      next(iterator)
  assert data.bad_data_counts()["bad_files"] - before == 1
  assert sum("cut.flac" in record.getMessage() for record in caplog.records) == 1


def test_prepare_audio_chunks_long_files_and_keeps_each_file_in_one_split(tmp_path):
  rng = np.random.default_rng(3)
  raw = tmp_path / "raw"
  raw.mkdir()
  originals = {}
  for name, seconds in (("a.flac", 7.3), ("b.flac", 2.0), ("c.wav", 0.5)):
    originals[name] = (0.5 * rng.standard_normal(int(seconds * RATE))).clip(-1, 1)
    soundfile.write(raw / name, originals[name], RATE, subtype="PCM_16")
  out = tmp_path / "shards"
  result = subprocess.run(
      [sys.executable, f"{helpers.REPO}/tools/prepare_audio.py", f"--source={raw}",
       f"--output={out}", "--sample_rate=16000", "--chunk_seconds=2", "--num_shards=1",
       "--num_workers=1"], capture_output=True, text=True, timeout=300, env=helpers.env_for())
  assert result.returncode == 0, result.stderr[-3000:]
  (sidecar,) = [json.loads(path.read_text()) for path in out.glob("*.json")]
  # 7.3 s -> 2 + 2 + 2 + 1.3 (kept: over a quarter chunk); 2.0 s and 0.5 s stay whole.
  assert sidecar["ids"] == ["a.flac#00000", "a.flac#00001", "a.flac#00002", "a.flac#00003",
                            "b.flac", "c.wav"]
  records = grain.sources.ArrayRecordDataSource([str(p) for p in out.glob("*.array_record")])
  decoded = np.concatenate([soundfile.read(io.BytesIO(records[i]),
                                           dtype="float32")[0] for i in range(4)])
  # The file is normalized once, then cut: the chunks are the normalized file, in order.
  stored = soundfile.read(raw / "a.flac", dtype="float32")[0]
  assert decoded.size == stored.size == originals["a.flac"].size
  np.testing.assert_allclose(decoded, stored / np.abs(stored).max(), atol=1e-4)
  assert len({split.is_heldout(i, 0.5) for i in sidecar["ids"][:4]}) == 1
  assert split.is_heldout(sidecar["ids"][0], 0.5) == split.is_heldout("a.flac", 0.5)
