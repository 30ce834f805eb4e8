"""tools/prepare_*.py and tools/make_spoken_digits.py, run as real commands on real files."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import soundfile

from s5scale import data
from s5scale import defaults
from s5scale.data import split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_tool(name, *args, env=None):
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args],
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))


def _config(source, **overrides):
  config = defaults.base_config().data
  config.update(dict(kind="text", source=str(source), batch_size=2, seq_len=32,
                     heldout_fraction=0.5, num_workers=0, read_threads=2))
  config.update(overrides)
  return config


def _assert_same_batches(first, second, atol=0.0):
  assert len(first) == len(second) > 0
  for one, other in zip(first, second):
    for key in one:
      np.testing.assert_allclose(one[key], other[key], atol=atol, err_msg=key)


def test_prepare_text_writes_shards_the_pipeline_reads_and_resumes(tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  for i in range(30):
    (raw / f"doc{i:02d}.txt").write_text(f"document number {i} " * (1 + i % 5))
  (raw / "broken.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
  (raw / "empty.txt").write_text("")
  out = tmp_path / "shards"
  first = _run_tool("prepare_text.py", f"--source={raw}", f"--output={out}", "--num_shards=3",
                    "--num_workers=1")
  assert first.returncode == 0, first.stderr
  assert "wrote 30 documents to 3 shards" in first.stdout and "2 bad documents" in first.stdout
  assert "broken.txt" in first.stderr and "empty.txt" in first.stderr and "ETA" in first.stderr
  shard_files = sorted(out.glob("*.array_record"))
  assert len(shard_files) == 3 and len(sorted(out.glob("*.array_record.json"))) == 3
  # Same ids -> same held-out split, in the same order: identical evaluation batches.
  from_raw = list(data.make_iterator(_config(raw), "heldout", num_epochs=1))
  from_shards = list(data.make_iterator(_config(out), "heldout", num_epochs=1))
  _assert_same_batches(from_raw, from_shards)
  # Resume: complete shards are not rewritten; a shard without its sidecar is.
  mtimes = [path.stat().st_mtime_ns for path in shard_files]
  (out / (shard_files[1].name + ".json")).unlink()
  second = _run_tool("prepare_text.py", f"--source={raw}", f"--output={out}", "--num_shards=3",
                     "--num_workers=1")
  assert second.returncode == 0 and "2 shards reused" in second.stdout
  new_mtimes = [path.stat().st_mtime_ns for path in shard_files]
  assert new_mtimes[0] == mtimes[0] and new_mtimes[2] == mtimes[2]
  assert new_mtimes[1] != mtimes[1]
  _assert_same_batches(from_shards,
                       list(data.make_iterator(_config(out), "heldout", num_epochs=1)))


def test_prepare_audio_resamples_once_and_keeps_labels(tmp_path):
  raw = tmp_path / "raw"
  for label, rate, frequency in [("cat", 16000, 300), ("cat", 44100, 600), ("dog", 8000, 900),
                                 ("dog", 22050, 1200), ("_background_noise_", 16000, 50)]:
    (raw / label).mkdir(parents=True, exist_ok=True)
    time = np.arange(rate // 4) / rate
    soundfile.write(raw / label / f"{frequency}.wav", 0.3 * np.sin(2 * np.pi * frequency * time),
                    rate, subtype="PCM_16")
  (raw / "dog" / "bad.wav").write_text("not audio")
  out = tmp_path / "shards"
  result = _run_tool("prepare_audio.py", f"--source={raw}", f"--output={out}",
                     "--sample_rate=16000", "--num_shards=2", "--num_workers=2")
  assert result.returncode == 0, result.stderr
  assert "wrote 5 clips" in result.stdout and "bad.wav" in result.stderr
  sidecars = [json.loads(path.read_text()) for path in sorted(out.glob("*.json"))]
  assert sorted(sum((s["labels"] for s in sidecars), [])) == [
      "_background_noise_", "cat", "cat", "dog", "dog"]
  config = _config(raw, kind="audio", task="classify", seq_len=4000, heldout_fraction=0.999999)
  assert data.num_classes(config) == 2 == data.num_classes(_config(out, **{
      k: config[k] for k in ("kind", "task")}))
  from_raw = list(data.make_iterator(config, "heldout", num_epochs=1))
  config.source = str(out)
  from_shards = list(data.make_iterator(config, "heldout", num_epochs=1))
  _assert_same_batches(from_raw, from_shards, atol=2e-4)    # 16-bit storage
  for batch in from_shards:
    for waveform, mask, label in zip(batch["inputs"][..., 0], batch["mask"], batch["label"]):
      if mask.any():
        peak = np.argmax(np.abs(np.fft.rfft(waveform))) * 16000 / 4000
        assert (peak in (300, 600)) == (label == 0)            # cat = 0, dog = 1



def test_prepare_audio_keeps_the_speech_commands_lists(tmp_path):
  raw = tmp_path / "raw"
  for label, frequency in [("cat", 300), ("cat", 600), ("dog", 900), ("dog", 1200)]:
    (raw / label).mkdir(parents=True, exist_ok=True)
    time = np.arange(4000) / 16000
    soundfile.write(raw / label / f"s{frequency}_nohash_0.wav",
                    0.3 * np.sin(2 * np.pi * frequency * time), 16000, subtype="PCM_16")
  (raw / "testing_list.txt").write_text("dog/s900_nohash_0.wav\n")
  (raw / "validation_list.txt").write_text("cat/s600_nohash_0.wav\n")
  out = tmp_path / "shards"
  result = _run_tool("prepare_audio.py", f"--source={raw}", f"--output={out}",
                     "--sample_rate=16000", "--num_shards=1", "--num_workers=1")
  assert result.returncode == 0, result.stderr
  for name in ("testing_list.txt", "validation_list.txt"):
    assert (out / name).read_text() == (raw / name).read_text()
  config = _config(out, kind="audio", task="classify", seq_len=4000, batch_size=1)
  peaks = {split: sorted(int(np.argmax(np.abs(np.fft.rfft(batch["inputs"][0, :, 0]))) * 4)
                         for batch in data.make_iterator(config, split, num_epochs=1)
                         if batch["mask"].any())
           for split in ("train", "heldout")}
  assert peaks == {"train": [300, 1200], "heldout": [900]}

_FAKE_ESPEAK = """\
#!/bin/sh
# Stand-in for espeak-ng: lists voices like it does, and "speaks" a prepared 22.05 kHz tone.
if [ "$1" = "--voices=en" ]; then
  echo "Pty Language       Age/Gender VoiceName          File                 Other Languages"
  echo " 2  en-us           --/M      English_(America)  gmw/en-US            (en 3)"
  echo " 5  en-us           --/M      us-mbrola-2        mb/mb-us2            (en 7)"
  exit 0
fi
while [ "$#" -gt 0 ]; do
  if [ "$1" = "-w" ]; then cp "{tone}" "$2"; fi
  shift
done
"""


def test_make_spoken_digits_writes_the_sc09_layout(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  time = np.arange(int(22050 * 0.4)) / 22050
  tone = np.concatenate([np.zeros(4000), 0.5 * np.sin(2 * np.pi * 440 * time), np.zeros(9000)])
  soundfile.write(tmp_path / "tone.wav", tone, 22050, subtype="PCM_16")
  fake = bin_dir / "espeak-ng"
  fake.write_text(_FAKE_ESPEAK.format(tone=tmp_path / "tone.wav"))
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  out = tmp_path / "digits"
  result = _run_tool("make_spoken_digits.py", f"--output={out}", "--variants=,f1",
                     "--speeds=150", "--pitches=40,60", "--num_workers=2",
                     env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
  assert result.returncode == 0, result.stderr
  digits = sorted(path.name for path in out.iterdir())
  assert digits == sorted(["zero", "one", "two", "three", "four", "five", "six", "seven",
                           "eight", "nine"])
  names = sorted(path.name for path in (out / "seven").iterdir())
  assert names == ["gmw-en-US-f1_nohash_150_40.wav", "gmw-en-US-f1_nohash_150_60.wav",
                   "gmw-en-US_nohash_150_40.wav", "gmw-en-US_nohash_150_60.wav"]  # no mbrola
  waveform, rate = soundfile.read(out / "seven" / "gmw-en-US-f1_nohash_150_60.wav")
  assert rate == 16000 and waveform.shape == (16000,)
  spectrum = np.abs(np.fft.rfft(waveform))
  assert abs(np.argmax(spectrum) - 440) <= 1                     # 1 Hz bins over 1 s
  loud = np.flatnonzero(np.abs(waveform) > 0.05)
  assert abs((loud[0] + loud[-1]) / 2 - 8000) < 100               # the word is centred
  config = _config(out, kind="audio", task="classify")
  assert data.num_classes(config) == 10


def test_make_spoken_digits_long_recordings_one_speaker_per_file(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  time = np.arange(22050) / 22050
  soundfile.write(tmp_path / "tone.wav", 0.5 * np.sin(2 * np.pi * 440 * time), 22050,
                  subtype="PCM_16")
  fake = bin_dir / "espeak-ng"
  fake.write_text(_FAKE_ESPEAK.format(tone=tmp_path / "tone.wav"))
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  out = tmp_path / "long"
  result = _run_tool("make_spoken_digits.py", f"--output={out}", "--long_seconds=0.5",
                     "--files_per_speaker=2", "--num_workers=2",
                     env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
  assert result.returncode == 0, result.stderr
  names = sorted(path.name for path in out.iterdir())
  speakers = ["gmw-en-US", "gmw-en-US-f2", "gmw-en-US-m3"]       # the voice x LONG_VARIANTS
  assert names == sorted(f"{s}_nohash_{n}.wav" for s in speakers for n in (0, 1))
  waveform, rate = soundfile.read(out / names[0])
  assert rate == 16000 and waveform.shape == (8000,)              # cut at --long_seconds
  assert {split.split_key(name) for name in names} == set(speakers)   # held out by voice


def test_make_spoken_digits_without_espeak_exits_2_saying_how_to_install(tmp_path):
  empty_bin = tmp_path / "bin"
  empty_bin.mkdir()
  result = _run_tool("make_spoken_digits.py", f"--output={tmp_path / 'digits'}",
                     env={"PATH": str(empty_bin)})
  assert result.returncode == 2
  assert "apt-get install espeak-ng" in result.stderr
  assert not (tmp_path / "digits").exists()
