"""Bad data on disk is skipped, counted and named in the log; nothing usable is a DataError."""

import logging

import numpy as np
import pytest
import soundfile

from s5scale import data
from s5scale import defaults

SEQ_LEN = 64


def _config(source, **overrides):
  config = defaults.base_config().data
  config.update(dict(kind="audio", source=str(source), batch_size=2, seq_len=SEQ_LEN, seed=0,
                     heldout_fraction=0.999999, num_workers=0, read_threads=2))
  config.update(overrides)
  return config


def _sine(path, rate, seconds, frequency):
  time = np.arange(int(rate * seconds)) / rate
  soundfile.write(path, 0.5 * np.sin(2 * np.pi * frequency * time), rate, subtype="PCM_16")


def _bad_audio_dir(root):
  """Two good 16 kHz clips, one good 44.1 kHz clip, and three broken files."""
  (root / "a").mkdir()
  (root / "b").mkdir()
  _sine(root / "a" / "good1.wav", 16000, 0.25, 300)
  _sine(root / "b" / "good2.wav", 16000, 0.25, 500)
  _sine(root / "a" / "resample_me.wav", 44100, 0.25, 1000)
  _sine(root / "a" / "whole.wav", 16000, 0.5, 700)
  whole = (root / "a" / "whole.wav").read_bytes()
  (root / "a" / "whole.wav").unlink()
  (root / "a" / "truncated.wav").write_bytes(whole[:len(whole) // 2])
  (root / "b" / "empty.wav").write_bytes(b"")
  (root / "b" / "notes.wav").write_text("these are my notes, not audio\n" * 20)


def test_bad_audio_files_are_skipped_counted_and_logged(tmp_path, caplog):
  _bad_audio_dir(tmp_path)
  before = data.bad_data_counts()["bad_files"]
  with caplog.at_level(logging.WARNING):
    batches = list(data.make_iterator(_config(tmp_path), "heldout", num_epochs=1))
  assert data.bad_data_counts()["bad_files"] - before == 3
  for name in ("truncated.wav", "empty.wav", "notes.wav"):
    assert sum(name in record.getMessage() for record in caplog.records) == 1, name
  assert not any("resample_me" in record.getMessage() or "good" in record.getMessage()
                 for record in caplog.records)
  # The evaluation windows cover every good clip exactly once at 16 kHz: 0.25 s is 4000
  # samples, i.e. 3999 next-sample targets each (the 44.1 kHz clip included, resampled).
  assert sum(batch["mask"].sum() for batch in batches) == 3 * 3999
  # The resampled clip keeps its 1 kHz tone: find its rows (they start with reset).
  waveforms = [data.decode_tokens(_config(tmp_path), row)
               for batch in batches for row, mask in zip(batch["inputs"], batch["mask"])
               if mask.all()]
  frequencies = {round(np.argmax(np.abs(np.fft.rfft(w))) * 16000 / SEQ_LEN, -2)
                 for w in waveforms}
  assert 1000 in frequencies


def test_bad_files_are_skipped_in_training_too(tmp_path):
  _bad_audio_dir(tmp_path)
  config = _config(tmp_path, heldout_fraction=0.0)
  iterator = data.make_iterator(config, "train")
  batches = [next(iterator) for _ in range(20)]   # several epochs over 3 good clips
  assert all(batch["mask"].sum() == 2 * SEQ_LEN for batch in batches)


def test_bad_text_documents_are_skipped_counted_and_logged(tmp_path, caplog):
  (tmp_path / "good.txt").write_text("hello world, this is a fine document")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
  (tmp_path / "empty.txt").write_bytes(b"")
  (tmp_path / "blank.txt").write_text("  \n\t\n")
  (tmp_path / "also_good.txt").write_text("second good document")
  config = _config(tmp_path, kind="text")
  before = data.bad_data_counts()["bad_documents"]
  with caplog.at_level(logging.WARNING):
    batches = list(data.make_iterator(config, "heldout", num_epochs=1))
  assert data.bad_data_counts()["bad_documents"] - before == 3
  for name in ("latin1.txt", "empty.txt", "blank.txt"):
    assert sum(name in record.getMessage() for record in caplog.records) == 1, name
  text = "".join(data.decode_tokens(config, np.append(b["inputs"][r], b["targets"][r][-1]))
                 for b in batches for r in range(2) if b["mask"][r].any())
  assert "hello world, this is a fine document" in text and "second good document" in text


def test_bad_jsonl_lines_are_skipped(tmp_path, caplog):
  lines = ['{"text": "first document"}', "not json at all", '{"title": "no text field"}',
           '{"text": ""}', '{"text": "second document"}']
  (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
  config = _config(tmp_path, kind="text", seq_len=128)
  before = data.bad_data_counts()["bad_documents"]
  with caplog.at_level(logging.WARNING):
    batch = next(data.make_iterator(config, "heldout", num_epochs=1))
  assert data.bad_data_counts()["bad_documents"] - before == 3
  for line_number in (2, 3, 4):
    assert any(f"docs.jsonl:{line_number}" in r.getMessage() for r in caplog.records)
  decoded = data.decode_tokens(config, batch["inputs"][0])
  assert "first document" in decoded and "second document" in decoded


def test_an_empty_source_is_a_data_error_naming_it(tmp_path):
  with pytest.raises(data.DataError, match=str(tmp_path)):
    data.make_iterator(_config(tmp_path), "train")
  with pytest.raises(data.DataError, match=str(tmp_path)):
    data.make_iterator(_config(tmp_path, kind="text"), "train")
  (tmp_path / "readme.md").write_text("no audio here")
  with pytest.raises(data.DataError, match=str(tmp_path)):
    data.make_iterator(_config(tmp_path), "train")
  with pytest.raises(data.DataError, match="does-not-exist"):
    data.make_iterator(_config(tmp_path / "does-not-exist"), "train")


def test_a_source_with_only_bad_files_is_a_data_error(tmp_path):
  (tmp_path / "empty.wav").write_bytes(b"")
  (tmp_path / "text.wav").write_text("hello")
  (tmp_path / "zeros.flac").write_bytes(b"\0" * 100)
  iterator = data.make_iterator(_config(tmp_path, heldout_fraction=0.0), "train")
  with pytest.raises(data.DataError, match=str(tmp_path)):
    next(iterator)
  iterator = data.make_iterator(_config(tmp_path, heldout_fraction=0.0), "train",
                                process_index=1, process_count=2)
  with pytest.raises(data.DataError, match=str(tmp_path)):
    next(iterator)
  iterator = data.make_iterator(_config(tmp_path), "heldout", num_epochs=1)
  with pytest.raises(data.DataError, match=str(tmp_path)):
    next(iterator)
