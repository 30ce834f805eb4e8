"""The embedded audio corpus: deterministic synthetic clips, so a fresh machine needs no download.

What it is, honestly: NUM_CLIPS one-second clips synthesised with NumPy from a fixed seed (the
corpus does not change with data.seed, like a real data set). Each clip is one of six categories:

  note     one harmonic note (fundamental 80–1000 Hz, 3–8 partials with 1/k^tilt amplitudes,
           light vibrato) under an attack–decay–sustain–release envelope;
  chord    two to four such notes started together, at just-intonation intervals;
  melody   three to eight short notes in sequence from a pentatonic scale;
  chirp    an exponential sine sweep (up or down, 100 Hz–6 kHz) with a smooth envelope;
  noise    a burst of noise shaped in the frequency domain (random band-pass) with an envelope;
  drum     decaying noise plus a pitch-dropping sine, repeated at a random tempo.

A little background noise is added to every clip. It is not speech or music: it has pitch,
harmonics, onsets and silence, enough for a next-sample model to learn far below 8 bits/sample
and for a classifier to tell the six categories apart (labels are the category names).
"""

import functools

import numpy as np

NUM_CLIPS = 512
CLIP_SECONDS = 1.0
CORPUS_SEED = 20240917
CATEGORIES = ("chirp", "chord", "drum", "melody", "noise", "note")
_JUST_RATIOS = (1.0, 5 / 4, 4 / 3, 3 / 2, 5 / 3, 2.0)
_PENTATONIC = (0, 2, 4, 7, 9, 12, 14, 16)


def clip_id(index: int) -> str:
  """Stable id of clip `index`, used for the held-out hash."""
  return f"procedural/{clip_category(index)}/clip_{index:05d}"


def clip_category(index: int) -> str:
  """Category name of clip `index` (round-robin, so every category has NUM_CLIPS/6 clips)."""
  return CATEGORIES[index % len(CATEGORIES)]


def _envelope(rng, length, sample_rate):
  """Attack–decay–sustain–release envelope, (length,) float64."""
  attack = int(rng.uniform(0.002, 0.08) * sample_rate)
  decay = int(rng.uniform(0.02, 0.2) * sample_rate)
  release = int(rng.uniform(0.02, 0.3) * sample_rate)
  sustain_level = rng.uniform(0.3, 0.9)
  sustain = max(length - attack - decay - release, 0)
  pieces = [np.linspace(0, 1, attack, endpoint=False),
            np.linspace(1, sustain_level, decay, endpoint=False),
            np.full(sustain, sustain_level),
            np.linspace(sustain_level, 0, release)]
  envelope = np.concatenate(pieces)[:length]
  return np.pad(envelope, (0, length - envelope.size))


def _harmonic_note(rng, fundamental, length, sample_rate):
  """A note with partials 1..K, 1/k^tilt amplitudes and vibrato, under an envelope."""
  time = np.arange(length) / sample_rate
  vibrato = 1 + rng.uniform(0, 0.006) * np.sin(2 * np.pi * rng.uniform(3, 7) * time)
  phase = 2 * np.pi * fundamental * np.cumsum(vibrato) / sample_rate
  tilt = rng.uniform(0.7, 2.0)
  nyquist_partials = int((sample_rate / 2) // fundamental)
  partials = range(1, max(1, min(int(rng.integers(3, 9)), nyquist_partials)) + 1)
  note = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k**tilt for k in partials)
  return note * _envelope(rng, length, sample_rate)


def _note(rng, length, sample_rate):
  return _harmonic_note(rng, rng.uniform(80, 1000), length, sample_rate)


def _chord(rng, length, sample_rate):
  root = rng.uniform(100, 500)
  ratios = rng.choice(_JUST_RATIOS, size=int(rng.integers(2, 5)), replace=False)
  return sum(_harmonic_note(rng, root * ratio, length, sample_rate) for ratio in ratios)


def _melody(rng, length, sample_rate):
  tonic = rng.uniform(150, 600)
  clip = np.zeros(length)
  boundaries = np.sort(rng.choice(np.arange(1, 20), size=int(rng.integers(2, 8)), replace=False))
  starts = np.concatenate([[0], boundaries * length // 20])
  ends = np.concatenate([starts[1:], [length]])
  for start, end in zip(starts, ends):
    fundamental = tonic * 2 ** (rng.choice(_PENTATONIC) / 12)
    clip[start:end] = _harmonic_note(rng, fundamental, end - start, sample_rate)
  return clip


def _chirp(rng, length, sample_rate):
  low, high = 100.0, min(6000.0, 0.45 * sample_rate)
  start, stop = np.exp(rng.uniform(np.log(low), np.log(high), size=2))
  time = np.arange(length) / sample_rate
  duration = length / sample_rate
  # Exponential sweep: the instantaneous frequency moves from start to stop geometrically.
  rate = np.log(stop / start) / duration if stop != start else 0.0
  phase = (2 * np.pi * start * (np.expm1(rate * time) / rate if rate else time))
  return np.sin(phase) * np.hanning(length) ** rng.uniform(0.2, 1.0)


def _noise(rng, length, sample_rate):
  spectrum = np.fft.rfft(rng.standard_normal(length))
  frequencies = np.fft.rfftfreq(length, 1 / sample_rate)
  centre = np.exp(rng.uniform(np.log(200), np.log(0.4 * sample_rate)))
  width = centre * rng.uniform(0.1, 1.0)
  spectrum *= np.exp(-0.5 * ((frequencies - centre) / width) ** 2)
  return np.fft.irfft(spectrum, n=length) * _envelope(rng, length, sample_rate)


def _drum(rng, length, sample_rate):
  hit_length = int(rng.uniform(0.08, 0.25) * sample_rate)
  time = np.arange(hit_length) / sample_rate
  decay = np.exp(-time * rng.uniform(15, 60))
  pitch = rng.uniform(50, 200) * (1 + 2 * np.exp(-time * 40))
  hit = (np.sin(2 * np.pi * np.cumsum(pitch) / sample_rate)
         + rng.uniform(0, 1) * rng.standard_normal(hit_length)) * decay
  clip = np.zeros(length)
  period = int(rng.uniform(0.15, 0.5) * sample_rate)
  for start in range(int(rng.integers(0, period)), length, period):
    end = min(start + hit_length, length)
    clip[start:end] += hit[:end - start] * rng.uniform(0.5, 1.0)
  return clip


_SYNTHESIZERS = {"note": _note, "chord": _chord, "melody": _melody, "chirp": _chirp,
                 "noise": _noise, "drum": _drum}


@functools.lru_cache(maxsize=NUM_CLIPS)
def generate_clip(index: int, sample_rate: int) -> np.ndarray:
  """Clip `index` of the corpus: float32 (round(CLIP_SECONDS * sample_rate),), peak 1, read-only.

  A function of (index, sample_rate) only, so every process and worker regenerates the same clip.
  Memoized (the whole corpus is 32 MB at 16 kHz): synthesis costs ~2 ms a clip, and training
  visits each clip many times.
  """
  rng = np.random.default_rng([CORPUS_SEED, index])
  length = int(round(CLIP_SECONDS * sample_rate))
  clip = _SYNTHESIZERS[clip_category(index)](rng, length, sample_rate)
  clip = clip + rng.uniform(0.001, 0.01) * rng.standard_normal(length)
  clip = (clip / np.max(np.abs(clip))).astype(np.float32)
  clip.flags.writeable = False   # shared by every visit through the cache
  return clip
