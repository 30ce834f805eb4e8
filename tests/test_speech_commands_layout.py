"""Speech Commands layout on real WAV files: its list files, speaker-grouped splits, old ids kept.

Every clip is a 0.1 s sine whose frequency is unique to the file, so the files that reach a batch
are identified from the batch itself (FFT peak), independently of the pipeline's ids.
"""

import functools
import hashlib
import logging
import shutil

import numpy as np
import soundfile

from s5scale import data
from s5scale import defaults
from s5scale.data import shards
from s5scale.data import sources
from s5scale.data import split

SAMPLE_RATE = 8000
CLIP = SAMPLE_RATE // 10          # 0.1 s: FFT bins 10 Hz apart
WORDS = ("left", "right", "yes")


def _sha1_fraction(key):
  """Oracle of the hash split: first 8 bytes of SHA-1, big-endian, over 2**64."""
  return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _write_tree(root, relpaths):
  """One sine per file, 200 Hz + 40 Hz × its position; returns {frequency: relpath}."""
  by_frequency = {}
  for k, relpath in enumerate(relpaths):
    frequency = 200 + 40 * k
    assert frequency < SAMPLE_RATE / 2
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    time = np.arange(CLIP) / SAMPLE_RATE
    soundfile.write(path, 0.5 * np.sin(2 * np.pi * frequency * time), SAMPLE_RATE,
                    subtype="PCM_16")
    by_frequency[frequency] = relpath
  return by_frequency


def _config(source, **overrides):
  config = defaults.base_config().data
  config.update(dict(kind="audio", task="classify", source=str(source), sample_rate=SAMPLE_RATE,
                     seq_len=CLIP, batch_size=2, heldout_fraction=0.3, num_workers=0,
                     read_threads=1))
  config.update(overrides)
  return config


def _files_seen(config, split_name, by_frequency):
  """[(relpath, label id)] of every real row of one pass over the split (from FFT peaks)."""
  seen = []
  for batch in data.make_iterator(config, split_name, num_epochs=1):
    for waveform, mask, label in zip(batch["inputs"][..., 0], batch["mask"], batch["label"]):
      if mask.any():
        frequency = int(round(np.argmax(np.abs(np.fft.rfft(waveform))) * SAMPLE_RATE / CLIP))
        seen.append((by_frequency[frequency], int(label)))
  return seen


def _split_ids(source_dir, split_name, fraction=0.3):
  source = sources.open_source("audio", str(source_dir), SAMPLE_RATE)
  indices = split.split_indices(source.ids, split_name, fraction, source.listed_split)
  return sorted(source.ids[i] for i in indices)


def test_testing_list_is_the_heldout_split_and_validation_list_is_in_neither(tmp_path, caplog):
  root = tmp_path / "speech_commands"
  speakers = ["0a7c2a8d", "0b09edd3", "1b4c9b89", "2aca1e72", "3bfd30e6", "4c77947d"]
  word_files = [f"{word}/{speaker}_nohash_{n}.wav" for word in WORDS for speaker in speakers
                for n in range(1 + (len(word) + int(speaker[0])) % 2)]
  noise = ["_background_noise_/pink_noise.wav", "_background_noise_/running_tap.wav"]
  by_frequency = _write_tree(root, word_files + noise)
  testing = [f for f in word_files if f.split("/")[1].startswith(("0a7c", "2aca"))]
  validation = [f for f in word_files if f.split("/")[1].startswith("4c77")]
  # SC's lists end with a newline; one listed path was never downloaded.
  (root / "testing_list.txt").write_text("\n".join(testing + ["yes/ffffffff_nohash_0.wav"]) + "\n")
  (root / "validation_list.txt").write_text("\n".join(validation) + "\n")
  train = sorted(set(word_files) - set(testing) - set(validation))
  assert len(testing) >= 4 and len(validation) >= 2 and len(train) >= 8

  config = _config(root, heldout_fraction=0.9)     # ignored: the lists decide
  with caplog.at_level(logging.INFO, logger="s5scale.data"):
    assert data.num_classes(config) == 3
  assert data.label_names(config) == list(WORDS)
  assert any("heldout_fraction is ignored" in r.getMessage() for r in caplog.records)
  assert any(r.levelno == logging.WARNING and "1 paths" in r.getMessage()
             for r in caplog.records)

  # Split API on ids: held-out = the testing list; validation (and only it) in neither split.
  assert _split_ids(root, "heldout") == sorted(testing)
  assert _split_ids(root, "train") == sorted(train + noise)   # noise: not a class, dropped below

  # End to end: the clips in the batches, identified by their tone, with their folder's label.
  label_of = {f: WORDS.index(f.split("/")[0]) for f in word_files}
  heldout_seen = _files_seen(config, "heldout", by_frequency)
  assert sorted(heldout_seen) == sorted((f, label_of[f]) for f in testing)
  train_seen = _files_seen(config, "train", by_frequency)
  assert sorted(train_seen) == sorted((f, label_of[f]) for f in train)

  # Prepared shards keep the relative paths as ids: with the lists beside them, the same split.
  prepared = tmp_path / "prepared"
  raw_source = sources.open_source("audio", str(root), SAMPLE_RATE)
  shards.write_shards(raw_source, functools.partial(shards.audio_record, sample_rate=SAMPLE_RATE),
                      str(prepared), num_shards=2, num_workers=1)
  for name in ("testing_list.txt", "validation_list.txt"):
    shutil.copy(root / name, prepared / name)
  assert _split_ids(prepared, "heldout") == sorted(testing)
  assert _split_ids(prepared, "train") == sorted(train + noise)


def test_nohash_clips_split_by_speaker_across_word_folders(tmp_path):
  root = tmp_path / "by_speaker"
  speakers = [hashlib.md5(str(k).encode()).hexdigest()[:8] for k in range(16)]
  files = [f"{word}/{speaker}_nohash_{n}.wav" for word in WORDS
           for k, speaker in enumerate(speakers) for n in range(1 + (len(word) + k) % 2)]
  by_frequency = _write_tree(root, files)
  heldout_speakers = {s for s in speakers if _sha1_fraction(s) < 0.3}
  assert 0 < len(heldout_speakers) < len(speakers)      # both splits populated
  expected_heldout = sorted(f for f in files if f.split("/")[1].split("_")[0] in heldout_speakers)
  # The old rule (hash of the whole path) would scatter some speaker over both splits, so this
  # test tells the two rules apart.
  assert any(len({_sha1_fraction(f) < 0.3 for f in files if f"/{s}_" in f}) == 2
             for s in speakers)

  assert _split_ids(root, "heldout") == expected_heldout
  assert _split_ids(root, "train") == sorted(set(files) - set(expected_heldout))
  heldout_seen = _files_seen(_config(root), "heldout", by_frequency)
  assert sorted(f for f, _ in heldout_seen) == expected_heldout

  # Prepared shards (ids from the sidecars) split by speaker too.
  prepared = tmp_path / "prepared"
  shards.write_shards(sources.open_source("audio", str(root), SAMPLE_RATE),
                      functools.partial(shards.audio_record, sample_rate=SAMPLE_RATE),
                      str(prepared), num_shards=3, num_workers=1)
  assert _split_ids(prepared, "heldout") == expected_heldout


def test_ids_without_a_speaker_keep_their_path_hash_split(tmp_path):
  ids = [f"cat/clip{k}.wav" for k in range(40)] + [
      "dog/a_hash_1.wav",                          # not the marker
      "x_nohash_dir/clip.flac",                    # marker in a folder, not the file name
      "_nohash_0.wav",                             # no speaker before the marker
      "notes/a_nohash_1.txt",                      # text file
      "docs/b_nohash_2.jsonl:3",                   # JSON Lines document
      "shard-00000-of-00001.array_record:5",       # shard without sidecar ids
      "procedural/notes/clip_00007",
  ]
  for fraction in (0.05, 0.3, 0.7):
    expected = [i for i, item_id in enumerate(ids) if _sha1_fraction(item_id) < fraction]
    assert list(split.split_indices(ids, "heldout", fraction)) == expected
    assert list(split.split_indices(ids, "train", fraction)) == sorted(
        set(range(len(ids))) - set(expected))
  assert all(split.split_key(item_id) == item_id for item_id in ids)
  assert split.split_key("right/bb05582b_nohash_3.wav") == "bb05582b"
  assert split.split_key("sc/right/BB05582B_nohash_0.WAV") == "BB05582B"

  # On disk, a plain label-folder tree: the held-out clips are those the path hash picks.
  relpaths = [f"{word}/take{k}.wav" for word in WORDS for k in range(6)]
  by_frequency = _write_tree(tmp_path / "plain", relpaths)
  expected = sorted(f for f in relpaths if _sha1_fraction(f) < 0.3)
  assert 0 < len(expected) < len(relpaths)
  seen = _files_seen(_config(tmp_path / "plain"), "heldout", by_frequency)
  assert sorted(f for f, _ in seen) == expected
  assert sources.open_source("audio", str(tmp_path / "plain"), SAMPLE_RATE).listed_split is None
