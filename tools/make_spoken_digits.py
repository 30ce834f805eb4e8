"""Build an SC09-style spoken-digit set (zero..nine) with the espeak-ng speech synthesizer.

  sudo apt-get install espeak-ng        # Debian/Ubuntu; macOS: brew install espeak-ng
  python tools/make_spoken_digits.py --output=data/spoken_digits
  python -m s5scale.train --config=configs/audio_small.py --workdir=workdirs/digits \
      --config.data.source=data/spoken_digits

Writes OUTPUT/<digit>/<speaker>_nohash_<speed>_<pitch>.wav: one-second, 16 kHz, 16-bit mono
clips with the word centred (the Speech Commands / SC09 layout, so data.task="classify" reads the
labels from the folder names). The speaker is the espeak-ng voice and variant with '/', '+' and
'_' made '-' (e.g. "gmw-en-US-f2"); as in Speech Commands, "_nohash_" makes the held-out split
group by speaker (s5scale/data/split.py), so evaluation hears only voices that training never did.
The defaults give 8 voices × 8 variants × 3 speeds × 3 pitches = 576 clips per digit.
It is synthetic speech: far less varied than SC09's human speakers, but real spoken words.
Exit 2 when espeak-ng is missing or the flags are wrong. Re-running skips existing files.

Long recordings (data.carry_state: context across minutes, not one window):

  python tools/make_spoken_digits.py --output=data/long_digits --long_seconds=120

writes OUTPUT/<speaker>_nohash_<n>.wav instead: each file one speaker (voice and variant) reading
random digit strings for about --long_seconds, at one speed and pitch drawn for the file, so
what a window can learn from the windows before it (who speaks, how fast, how high) is there to
learn. Unless --variants is given, the speakers are every English voice x LONG_VARIANTS (24
speakers, 48 minutes at the defaults, 88 MB; 16 s on 2 cores). The held-out split groups by
speaker, as for the clips; with 24 speakers data.heldout_fraction=0.05 holds out none, 0.1 holds
out two (gmw-en, gmw-en-GB-x-gbclan-f2).
"""

import concurrent.futures
import os
import shutil
import subprocess
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np
import soundfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from s5scale.data import audio  # pylint: disable=g-import-not-at-top,wrong-import-position

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SAMPLE_RATE = 16000
_DEFAULT_VARIANTS = ("", "m1", "m3", "m7", "f1", "f2", "f4", "klatt")

_OUTPUT = flags.DEFINE_string("output", None, "Output root directory.", required=True)
_VOICES = flags.DEFINE_list("voices", [], "espeak-ng voices (default: every English voice).")
_VARIANTS = flags.DEFINE_list("variants", list(_DEFAULT_VARIANTS),
                              "Voice variants ('' = the plain voice).")
_SPEEDS = flags.DEFINE_list("speeds", ["120", "160", "210"], "Words per minute.")
_PITCHES = flags.DEFINE_list("pitches", ["25", "50", "75"], "espeak-ng pitch, 0..99.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Parallel espeak-ng calls.")
_LONG_SECONDS = flags.DEFINE_float("long_seconds", 0.0, "0: one-second digit clips; > 0: long "
                                   "recordings of about this many seconds (module docstring).")
_FILES_PER_SPEAKER = flags.DEFINE_integer("files_per_speaker", 1, "Long recordings per speaker.")
_SEED = flags.DEFINE_integer("seed", 0, "Long recordings: seeds the digit strings, speeds, pitches.")
LONG_VARIANTS = ("", "f2", "m3")


def espeak_binary() -> str:
  binary = shutil.which("espeak-ng")
  if binary is None:
    raise FileNotFoundError(
        "espeak-ng is not installed. Install it with `sudo apt-get install espeak-ng` "
        "(Debian/Ubuntu), `sudo dnf install espeak-ng` (Fedora) or `brew install espeak-ng` "
        "(macOS), then re-run.")
  return binary


def english_voices(binary: str) -> list[str]:
  """Voice files of the built-in English voices (mbrola voices need extra packages; skipped)."""
  listing = subprocess.run([binary, "--voices=en"], capture_output=True, text=True, check=True)
  voices = []
  for line in listing.stdout.splitlines()[1:]:
    columns = line.split()
    if len(columns) >= 5 and columns[1].startswith("en") and not columns[4].startswith("mb/"):
      voices.append(columns[4])
  return sorted(set(voices))


def centre_in_one_second(waveform: np.ndarray) -> np.ndarray:
  """Trims leading/trailing near-silence, then centres (or centre-crops) in SAMPLE_RATE samples."""
  loud = np.flatnonzero(np.abs(waveform) > 0.02 * max(np.max(np.abs(waveform)), 1e-9))
  if loud.size:
    waveform = waveform[loud[0]:loud[-1] + 1]
  if waveform.size >= SAMPLE_RATE:
    start = (waveform.size - SAMPLE_RATE) // 2
    return waveform[start:start + SAMPLE_RATE]
  before = (SAMPLE_RATE - waveform.size) // 2
  return np.pad(waveform, (before, SAMPLE_RATE - waveform.size - before))


def synthesize(binary, word, voice, variant, speed, pitch, path) -> str | None:
  """Writes one clip; returns an error message or None."""
  return _speak_to_wav(binary, voice, variant, speed, pitch, word, path, centre_in_one_second)


def _speak_to_wav(binary, voice, variant, speed, pitch, text, path, shape) -> str | None:
  """espeak-ng reads `text` into a temporary WAV, which is decoded, made mono at SAMPLE_RATE,
  passed through shape (waveform -> waveform) and written to path as 16-bit PCM; returns an
  error message or None."""
  name = voice + (f"+{variant}" if variant else "")
  temporary = path + ".tmp.wav"
  result = subprocess.run([binary, "-v", name, "-s", str(speed), "-p", str(pitch), "-w",
                           temporary, "--stdin"], input=text.encode(), capture_output=True,
                          check=False)
  try:
    if result.returncode != 0 or not os.path.exists(temporary):
      return f"espeak-ng -v {name} failed: {result.stderr.decode(errors='replace').strip()}"
    with open(temporary, "rb") as stream:
      waveform, rate = audio.decode(stream.read())
    waveform = shape(audio.resample(audio.to_mono(waveform), rate, SAMPLE_RATE))
    soundfile.write(temporary, np.clip(waveform, -1, 1), SAMPLE_RATE, subtype="PCM_16")
    os.replace(temporary, path)
  except audio.UnreadableAudio as error:
    return f"espeak-ng -v {name} wrote unreadable audio: {error}"
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
  return None


def speaker_name(voice: str, variant: str) -> str:
  """E.g. gmw/en-US + f2 -> gmw-en-US-f2: filename-safe, with no "_" to blur "_nohash_"."""
  name = f"{voice}+{variant}" if variant else voice
  return name.replace("/", "-").replace("+", "-").replace("_", "-")


def jobs(binary, output):
  voices = _VOICES.value or english_voices(binary)
  for digit in DIGITS:
    os.makedirs(os.path.join(output, digit), exist_ok=True)
    for voice in voices:
      for variant in _VARIANTS.value:
        for speed in _SPEEDS.value:
          for pitch in _PITCHES.value:
            path = os.path.join(output, digit,
                                f"{speaker_name(voice, variant)}_nohash_{speed}_{pitch}.wav")
            if not os.path.exists(path):
              yield (binary, digit, voice, variant, int(speed), int(pitch), path)


def digit_strings(rng, num_words: int) -> str:
  """Groups of 2-9 digit words ("four seven one. two, nine ..."), punctuation varying pauses."""
  words, groups = 0, []
  while words < num_words:
    size = int(rng.integers(2, 10))
    groups.append(" ".join(rng.choice(DIGITS, size)) + str(rng.choice([".", ",", "?", "."])))
    words += size
  return " ".join(groups)


def synthesize_long(binary, voice, variant, speed, pitch, seconds, seed, path) -> str | None:
  """Writes one long recording of about `seconds` (cut there); returns an error or None."""
  # espeak-ng speaks about `speed` words a minute; ask for a third more, then cut.
  text = digit_strings(np.random.default_rng(seed), int(seconds * speed / 60 * 4 / 3) + 1)
  return _speak_to_wav(binary, voice, variant, speed, pitch, text, path,
                       lambda waveform: waveform[:int(seconds * SAMPLE_RATE)])


def long_jobs(binary, output):
  voices = _VOICES.value or english_voices(binary)
  variants = _VARIANTS.value if flags.FLAGS["variants"].present else LONG_VARIANTS
  os.makedirs(output, exist_ok=True)
  number = 0
  for voice in voices:
    for variant in variants:
      for n in range(_FILES_PER_SPEAKER.value):
        rng = np.random.default_rng([_SEED.value, number])
        number += 1
        path = os.path.join(output, f"{speaker_name(voice, variant)}_nohash_{n}.wav")
        if not os.path.exists(path):
          yield (binary, voice, variant, int(rng.choice(_SPEEDS.value)),
                 int(rng.choice(_PITCHES.value)), _LONG_SECONDS.value,
                 [_SEED.value, number], path)


def main(argv):
  del argv
  long_mode = _LONG_SECONDS.value > 0
  try:
    binary = espeak_binary()
    pending = list(long_jobs(binary, _OUTPUT.value) if long_mode else jobs(binary, _OUTPUT.value))
  except (FileNotFoundError, ValueError) as error:
    logging.error("%s", error)
    sys.exit(2)
  what = "long recordings" if long_mode else "clips"
  logging.info("synthesizing %d %s into %s", len(pending), what, _OUTPUT.value)
  failures = 0
  work = (lambda job: synthesize_long(*job)) if long_mode else (lambda job: synthesize(*job))
  with concurrent.futures.ThreadPoolExecutor(_NUM_WORKERS.value) as executor:
    for done, error in enumerate(executor.map(work, pending), 1):
      if error:
        failures += 1
        logging.warning("%s", error)
      if done % (10 if long_mode else 500) == 0:
        logging.info("%d/%d %s", done, len(pending), what)
  print(f"wrote {len(pending) - failures} {what} to {_OUTPUT.value} ({failures} failed)")
  if failures == len(pending) and pending:
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
