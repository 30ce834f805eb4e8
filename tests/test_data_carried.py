"""data.carry_state: each batch row streams whole items in order, window after window.

Oracle: the files themselves. A lane's windows, joined, must be whole files back to back (each
file's tokens decoded on its own here), with a reset exactly at each file's start and the mask 0
exactly on the target that crosses into the next file; the lanes together must read every good
file once per epoch. The shuffled order is never recomputed: only its invariants are checked.
"""

import functools
import io
import json
import logging

import grain
import ml_collections
import numpy as np
import pytest
import soundfile

from s5scale import cli
from s5scale import data
from s5scale import defaults
from s5scale.data import audio
from s5scale.data import audio_streams
from s5scale.data import shards
from s5scale.data import sources

RATE = 16000
SEQ_LEN = 32
BOS, EOS = 257, 258


def _config(source, **overrides):
  config = defaults.base_config().data
  config.update(dict(kind="audio", source=str(source), batch_size=4, seq_len=SEQ_LEN, seed=5,
                     heldout_fraction=0.0, num_workers=0, read_threads=2, carry_state=True))
  config.update(overrides)
  return config


def _audio_dir(root, count, seed=0):
  """`count` noise files of distinct lengths; {relpath: the codes the pipeline should read}."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  codes = {}
  for i in range(count):
    relpath = f"v{i % 3}_nohash_{i:02d}.wav"
    soundfile.write(root / relpath, rng.uniform(-0.9, 0.9, 40 + 23 * i), RATE, subtype="PCM_16")
    waveform = audio.load_waveform((root / relpath).read_bytes(), RATE)
    codes[relpath] = audio.quantize(waveform, "mulaw", 8)
  return codes


def _text_dir(root, count, tag=""):
  """`count` documents of distinct lengths; {tag + relpath: [BOS] bytes [EOS]}."""
  root.mkdir(parents=True, exist_ok=True)
  tokens = {}
  for i in range(count):
    text = f"<{tag}doc {i:02d}>" + "".join(chr(97 + (i * j) % 26) for j in range(15 * i))
    (root / f"doc{i:02d}.txt").write_text(text)
    tokens[f"{tag}doc{i:02d}.txt"] = np.array([BOS, *text.encode(), EOS], np.int32)
  return tokens


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _lane_stream(batches, row):
  """A row's windows joined (they overlap by one token), and the reset / mask along it."""
  inputs = np.concatenate([b["inputs"][row] for b in batches])
  targets = np.concatenate([b["targets"][row] for b in batches])
  stream = np.append(inputs, batches[-1]["targets"][row, -1])
  np.testing.assert_array_equal(targets, stream[1:])     # window k's targets: [kL+1, kL+L]
  resets = np.concatenate([b["reset"][row] for b in batches])
  mask = np.concatenate([b["mask"][row] for b in batches])
  return stream, resets, mask


def _files_of_lane(stream, resets, mask, files):
  """The files a lane read in order, checking that the stream is exactly those files back to
  back (the last one possibly cut off), reset at each start and mask 0 at each file's end."""
  starts = list(np.flatnonzero(resets)) + [len(stream)]
  assert starts[0] == 0
  np.testing.assert_array_equal(mask == 0, resets[1:].tolist() + [False])
  read = []
  for begin, end in zip(starts, starts[1:]):
    piece = stream[begin:end]
    matches = [name for name, tokens in files.items()
               if len(tokens) >= len(piece) and np.array_equal(tokens[:len(piece)], piece)]
    if end == len(stream):           # unfinished: a prefix of some file (it may be short)
      assert matches, begin
      return read
    assert len(matches) == 1 and len(piece) == len(files[matches[0]]), (begin, end, matches)
    read.append(matches[0])
  return read


def _check_epochs(batches, files, batch_size, epochs):
  """Lane j's n-th file is global position j + n·B; each epoch's positions read every file once."""
  by_position = {}
  for lane in range(batch_size):
    for n, name in enumerate(_files_of_lane(*_lane_stream(batches, lane), files)):
      by_position[lane + n * batch_size] = name
  for epoch in range(epochs):
    names = [by_position[p] for p in range(epoch * len(files), (epoch + 1) * len(files))]
    assert sorted(names) == sorted(files), epoch
  return by_position


@pytest.mark.parametrize("kind", ["audio", "text"])
def test_lanes_stream_whole_items_in_order_each_once_per_epoch(tmp_path, kind):
  files = _audio_dir(tmp_path, 9) if kind == "audio" else _text_dir(tmp_path, 9)
  batches = _take(data.make_iterator(_config(tmp_path, kind=kind), "train"), 60)
  assert batches[0]["inputs"].shape == (4, SEQ_LEN) and batches[0]["reset"][:, 0].all()
  counted = batches[0]["target_bytes"] > 0      # text: EOS accounts for no byte
  assert (counted <= (batches[0]["mask"] > 0)).all() and (kind == "text" or counted.all())
  order = _check_epochs(batches, files, batch_size=4, epochs=2)
  assert [order[p] for p in range(9)] != [order[p] for p in range(9, 18)]  # reshuffled


def test_a_mixture_streams_whole_documents_of_both_sources(tmp_path):
  files = {**_text_dir(tmp_path / "a", 4, "a"), **_text_dir(tmp_path / "b", 4, "b")}
  before = data.source_counts()
  config = _config("", kind="text", mixture=f"a={tmp_path / 'a'}:1,b={tmp_path / 'b'}:1",
                   batch_size=2)
  batches = _take(data.make_iterator(config, "train"), 30)
  read = {name for lane in range(2) for name in _files_of_lane(*_lane_stream(batches, lane),
                                                                files)}
  assert {name[0] for name in read} == {"a", "b"}
  after = data.source_counts()
  assert all(after[f"examples/{n}"] > before.get(f"examples/{n}", 0) for n in "ab")


def test_global_batch_is_the_same_for_two_processes(tmp_path):
  _audio_dir(tmp_path, 9)
  config = _config(tmp_path)
  single = _take(data.make_iterator(config, "train"), 12)
  halves = [_take(data.make_iterator(config, "train", process_index=p, process_count=2), 12)
            for p in range(2)]
  for step, batch in enumerate(single):
    for key in batch:
      np.testing.assert_array_equal(
          batch[key], np.concatenate([halves[0][step][key], halves[1][step][key]]), key)


def test_resume_mid_item_from_a_json_state_is_bit_identical(tmp_path):
  _text_dir(tmp_path, 6)
  config = _config(tmp_path, kind="text")
  iterator = data.make_iterator(config, "train")
  _take(iterator, 7)
  state = json.loads(json.dumps(iterator.get_state()))
  assert any(lane["offset"] > 0 for lane in state["lanes"])       # mid-item
  expected = _take(iterator, 10)
  resumed = data.make_iterator(config, "train")
  resumed.set_state(state)
  for one, other in zip(expected, _take(resumed, 10)):
    for key in one:
      np.testing.assert_array_equal(one[key], other[key], key)


def test_a_corrupt_file_is_skipped_counted_and_logged(tmp_path, caplog):
  files = _audio_dir(tmp_path, 5)
  (tmp_path / "v9_nohash_99.wav").write_text("not audio at all\n" * 30)
  before = data.bad_data_counts()["bad_files"]
  with caplog.at_level(logging.WARNING, logger="s5scale.data"):
    batches = _take(data.make_iterator(_config(tmp_path, batch_size=2), "train"), 40)
  assert data.bad_data_counts()["bad_files"] == before + 1
  assert "v9_nohash_99.wav" in caplog.text
  _check_epochs(batches, files, batch_size=2, epochs=1)


@pytest.mark.parametrize("process_count", [1, 2])
def test_carried_heldout_rows_reproduce_each_file_exactly(tmp_path, process_count):
  files = _audio_dir(tmp_path / "heldout", 6, seed=1)     # 6 items in groups of 4: 4 + 2
  config = _config(tmp_path / "heldout", heldout_source=str(tmp_path / "heldout"))
  per_process = [list(data.carried_heldout_iterator(config, 4, 16, process_index=p,
                                                    process_count=process_count))
                 for p in range(process_count)]
  assert len({len(batches) for batches in per_process}) == 1     # all stop together
  batches = [{key: np.concatenate([p[step][key] for p in per_process]) for key in p0}
             for step, p0 in enumerate(per_process[0])]
  starts = [step for step, batch in enumerate(batches) if batch["reset"][0, 0]] + [len(batches)]
  names = sorted(files)        # held-out items are read in id order, row r = item g·B + r
  for group, (begin, end) in enumerate(zip(starts, starts[1:])):
    window = batches[begin:end]
    longest = max(len(files[n]) for n in names[group * 4:group * 4 + 4])
    assert end - begin == -(-(longest - 1) // 16)                 # until the longest ends
    for row in range(4):
      reset = np.stack([b["reset"][row] for b in window])
      mask = np.concatenate([b["mask"][row] for b in window]) > 0
      targets = np.concatenate([b["targets"][row] for b in window])[mask]
      if group * 4 + row >= len(names):
        assert not mask.any() and not reset.any()                 # a padding row
        continue
      tokens = files[names[group * 4 + row]]
      assert reset.sum() == 1 and reset[0, 0]
      assert window[0]["inputs"][row, 0] == tokens[0]
      np.testing.assert_array_equal(targets, tokens[1:])


def _full_config(**changes):
  config = defaults.base_config()
  for key, value in changes.items():
    section, name = key.split(".")
    config[section][name] = value
  return ml_collections.ConfigDict(config.to_dict())


@pytest.mark.parametrize("changes, other", [({"model.bidirectional": True}, "model.bidirectional"),
                                            ({"model.task": "classify", "data.task": "classify",
                                              "data.kind": "audio"}, "model.task")])
def test_carry_state_with_a_backward_scan_or_a_classifier_exits_2(changes, other, capsys):
  with pytest.raises(SystemExit) as stop:
    cli.exit_if_invalid(_full_config(**{"data.carry_state": True, **changes}))
  stderr = capsys.readouterr().err
  assert stop.value.code == 2 and "data.carry_state=True" in stderr and other in stderr
  cli.exit_if_invalid(_full_config(**changes))      # each alone is fine


def _normalized_codes(waveform):
  """The oracle's codes of a whole recording: float32 mono / its peak, mu-law 8 bit."""
  waveform = np.asarray(waveform, np.float32)
  return audio.quantize(waveform / np.abs(waveform).max(), "mulaw", 8)


def test_chunks_of_a_prepared_file_stream_as_one_item_in_order(tmp_path):
  raw, out, chunk = tmp_path / "raw", tmp_path / "shards", 200
  raw.mkdir()
  rng = np.random.default_rng(4)
  originals = {}
  # a: 5 chunks, its second one quiet; b: 4 (a short last one); c: one record, not chunked;
  # e: 2 chunks, its 10-sample tail dropped (under a quarter chunk).
  for name, length in (("a.wav", 1000), ("b.wav", 730), ("c.wav", 150), ("e.wav", 410)):
    waveform = rng.uniform(-0.8, 0.8, length)
    waveform[chunk:2 * chunk] *= 0.2
    soundfile.write(raw / name, waveform, RATE, subtype="PCM_16")
    originals[name] = soundfile.read(raw / name, dtype="float32")[0]
  encode = functools.partial(shards.audio_record, sample_rate=RATE, chunk_seconds=chunk / RATE)
  shards.write_shards(sources.open_source("audio", str(raw), RATE), encode, str(out), 2, 1)
  # Oracle: the records on disk, grouped by the file their id names, decoded by soundfile.
  ids = [i for p in sorted(out.glob("*.json")) for i in json.loads(p.read_text())["ids"]]
  records = grain.sources.ArrayRecordDataSource(sorted(map(str, out.glob("*.array_record"))))
  joined = {}
  for number, item_id in enumerate(ids):
    decoded = soundfile.read(io.BytesIO(records[number]), dtype="float32")[0]
    joined.setdefault(item_id.split("#")[0], []).append(decoded)
  assert [len(joined[name]) for name in sorted(joined)] == [5, 4, 1, 2]
  files = {}
  for name, pieces in joined.items():
    whole = np.concatenate(pieces)
    kept = originals[name][:whole.size]
    np.testing.assert_allclose(whole / np.abs(whole).max(), kept / np.abs(kept).max(), atol=1e-4)
    files[name] = _normalized_codes(whole)       # one peak for the file, not one per chunk
  batches = _take(data.make_iterator(_config(out, batch_size=2), "train"), 80)
  order = _check_epochs(batches, files, batch_size=2, epochs=2)   # one reset per file
  assert [order[p] for p in range(4)] != [order[p] for p in range(4, 8)]  # files reshuffled


def _long_files(root):
  """Two files a lane must seek in (mono WAV, stereo FLAC) and a short one; {name: codes}."""
  root.mkdir()
  rng = np.random.default_rng(6)
  files = {}
  for name, length, channels in (("long.wav", 9000, 1), ("long.flac", 7000, 2),
                                 ("short.wav", 300, 1)):
    soundfile.write(root / name, rng.uniform(-0.7, 0.7, (length, channels)), RATE,
                    subtype="PCM_16")
    whole = soundfile.read(root / name, dtype="float32", always_2d=True)[0]
    files[name] = _normalized_codes(whole.mean(axis=1, dtype=np.float32))
  return files


def _seek_config(root):
  return _config(root, batch_size=2, seq_len=1024, long_audio_seconds=4000 / RATE)


@pytest.fixture
def small_blocks(monkeypatch):
  """Blocks of 1500 samples, and the sizes of every read and whole decode made."""
  monkeypatch.setattr(audio_streams, "READ_AHEAD", 1500)
  reads, decoded = [], []
  read_crop, decode = audio.read_crop, audio.decode
  monkeypatch.setattr(audio, "read_crop", lambda sound, start, length, rate: (
      reads.append(length), read_crop(sound, start, length, rate))[1])
  monkeypatch.setattr(audio, "decode", lambda payload: (
      decoded.append(len(payload)), decode(payload))[1])
  return reads, decoded


def test_long_files_are_read_by_seeking_and_equal_the_whole_file_decode(tmp_path, small_blocks):
  files = _long_files(tmp_path / "raw")
  batches = _take(data.make_iterator(_seek_config(tmp_path / "raw"), "train"), 20)
  _check_epochs(batches, files, batch_size=2, epochs=1)
  reads, decoded = small_blocks
  assert reads and max(reads) <= 1500             # never more than a block at once
  assert decoded and max(decoded) < 2000          # only short.wav was decoded whole


def test_resume_in_the_middle_of_a_seeked_file_is_bit_identical(tmp_path, small_blocks):
  files = _long_files(tmp_path / "raw")
  config = _seek_config(tmp_path / "raw")
  iterator = data.make_iterator(config, "train")
  before = _take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  assert any(lane["offset"] > 0 for lane in state["lanes"])
  expected = _take(iterator, 17)
  resumed = data.make_iterator(config, "train")
  resumed.set_state(state)
  after = _take(resumed, 17)
  for one, other in zip(expected, after):
    for key in one:
      np.testing.assert_array_equal(one[key], other[key], key)
  _check_epochs(before + after, files, batch_size=2, epochs=1)


def test_a_long_file_cut_short_is_skipped_before_its_first_window(tmp_path, small_blocks, caplog):
  files = _long_files(tmp_path / "raw")
  cut = (tmp_path / "raw" / "long.wav").read_bytes()
  (tmp_path / "raw" / "v_cut.wav").write_bytes(cut[:len(cut) // 2])    # header says 9000
  before = data.bad_data_counts()["bad_files"]
  with caplog.at_level(logging.WARNING, logger="s5scale.data"):
    batches = _take(data.make_iterator(_seek_config(tmp_path / "raw"), "train"), 20)
  assert data.bad_data_counts()["bad_files"] == before + 1 and "v_cut.wav" in caplog.text
  _check_epochs(batches, files, batch_size=2, epochs=1)


@pytest.mark.parametrize("row_multiple, rows", [(1, 3), (2, 4), (8, 8)])
def test_carried_heldout_batch_shrinks_to_the_items_it_holds(tmp_path, row_multiple, rows):
  files = _audio_dir(tmp_path / "heldout", 3, seed=2)
  config = _config(tmp_path / "heldout", heldout_source=str(tmp_path / "heldout"))
  batches = list(data.carried_heldout_iterator(config, 8, 16, row_multiple=row_multiple))
  assert {batch["inputs"].shape[0] for batch in batches} == {rows}
  for row, name in enumerate(sorted(files)):
    mask = np.concatenate([b["mask"][row] for b in batches]) > 0
    targets = np.concatenate([b["targets"][row] for b in batches])[mask]
    np.testing.assert_array_equal(targets, files[name][1:])
  assert not any(b["mask"][3:].any() for b in batches)          # rows past the items: padding
