"""Audio transforms against independent oracles: FFT peaks, the mu-law formula, real WAV files."""

import math

import numpy as np
import soundfile

from s5scale import data
from s5scale import defaults
from s5scale.data import audio


def _peak_frequency(waveform, sample_rate):
  spectrum = np.abs(np.fft.rfft(waveform * np.hanning(waveform.size)))
  return np.fft.rfftfreq(waveform.size, 1 / sample_rate)[np.argmax(spectrum)]


def test_resampling_44k1_to_16k_keeps_a_440hz_sine(tmp_path):
  time = np.arange(44100) / 44100
  path = tmp_path / "a440.wav"
  soundfile.write(path, 0.5 * np.sin(2 * np.pi * 440 * time), 44100, subtype="FLOAT")
  waveform = audio.load_waveform(path.read_bytes(), 16000)
  assert waveform.shape == (16000,)
  assert abs(_peak_frequency(waveform, 16000) - 440) <= 1.0   # 1 Hz FFT resolution
  # Peak-normalized, and still a clean sine: RMS of a unit sine is 1/sqrt(2).
  assert abs(np.max(np.abs(waveform)) - 1) < 1e-6
  assert abs(np.sqrt(np.mean(waveform[1000:-1000] ** 2)) - 1 / math.sqrt(2)) < 0.01


def test_resampling_removes_content_above_the_new_nyquist():
  time = np.arange(44100) / 44100
  tone_10khz = np.sin(2 * np.pi * 10000 * time).astype(np.float32)   # would alias to 6 kHz
  tone_1khz = np.sin(2 * np.pi * 1000 * time).astype(np.float32)
  resampled = audio.resample(tone_10khz + tone_1khz, 44100, 16000)
  spectrum = np.abs(np.fft.rfft(resampled[500:-500]))
  frequencies = np.fft.rfftfreq(resampled.size - 1000, 1 / 16000)
  alias = spectrum[np.abs(frequencies - 6000) < 50].max()
  kept = spectrum[np.abs(frequencies - 1000) < 50].max()
  assert alias < 1e-2 * kept


def _mulaw_compand(x, mu):
  return np.sign(x) * np.log(1 + mu * np.abs(x)) / np.log(1 + mu)


def _mulaw_expand(y, mu):
  return np.sign(y) * ((1 + mu) ** np.abs(y) - 1) / mu


def test_mulaw_round_trip_is_within_the_quantization_bound():
  rng = np.random.default_rng(0)
  for bits in (8, 4, 10):
    mu = 2**bits - 1
    x = np.concatenate([np.linspace(-1, 1, 20001), rng.uniform(-1, 1, 5000),
                        rng.normal(0, 0.01, 5000).clip(-1, 1)])
    codes = audio.mulaw_encode(x, bits)
    assert codes.dtype == np.int32 and codes.min() >= 0 and codes.max() <= mu
    assert np.all(np.diff(codes[:20001]) >= 0)                       # monotone in x
    decoded = audio.mulaw_decode(codes, bits).astype(np.float64)
    # Codes are 2/mu apart in the companded domain, so rounding moves y by at most 1/mu; the
    # bound on x is how far the expansion moves within that interval.
    y = _mulaw_compand(x, mu)
    bound = np.maximum(np.abs(_mulaw_expand(np.clip(y + 1 / mu, -1, 1), mu) - x),
                       np.abs(_mulaw_expand(np.clip(y - 1 / mu, -1, 1), mu) - x))
    assert np.all(np.abs(decoded - x) <= bound + 1e-6), bits
    # Small amplitudes are resolved far more finely than by a uniform quantizer of equal bits.
    small = np.abs(x) < 0.01
    assert np.max(np.abs(decoded - x)[small]) < 1 / mu


def test_linear_round_trip_is_within_half_a_step():
  x = np.linspace(-1, 1, 10001)
  for bits in (8, 12):
    decoded = audio.linear_decode(audio.linear_encode(x, bits), bits)
    assert np.max(np.abs(decoded - x)) <= 1 / (2**bits - 1) + 1e-6


def test_decode_tokens_and_encode_prompt_for_audio(tmp_path):
  config = defaults.base_config().data
  config.kind = "audio"
  time = np.arange(22050) / 22050
  path = tmp_path / "prompt.wav"
  soundfile.write(path, np.stack([np.sin(2 * np.pi * 300 * time)] * 2, axis=1), 22050,
                  subtype="PCM_16")
  tokens = data.encode_prompt(config, str(path))
  assert tokens.dtype == np.int32 and tokens.shape == (16000,)     # stereo 22.05 kHz -> mono 16k
  assert data.vocab_size(config) == 256 and tokens.max() < 256
  waveform = data.decode_tokens(config, tokens)
  assert waveform.dtype == np.float32 and np.max(np.abs(waveform)) <= 1
  assert abs(_peak_frequency(waveform, 16000) - 300) <= 1.0


def test_procedural_corpus_is_deterministic_and_varied():
  from s5scale.data import procedural_audio  # pylint: disable=import-outside-toplevel
  first = [procedural_audio.generate_clip(i, 16000) for i in range(12)]
  again = [procedural_audio.generate_clip(i, 16000) for i in range(12)]
  for clip, clip_again in zip(first, again):
    assert clip.shape == (16000,) and clip.dtype == np.float32
    np.testing.assert_array_equal(clip, clip_again)
    assert np.all(np.isfinite(clip)) and abs(np.max(np.abs(clip)) - 1) < 1e-6
  peaks = {round(_peak_frequency(clip, 16000)) for clip in first}
  assert len(peaks) >= 8                                           # not one repeated sound
  codes = np.concatenate([audio.mulaw_encode(clip) for clip in first])
  histogram = np.bincount(codes, minlength=256) / codes.size
  entropy = -np.sum(histogram[histogram > 0] * np.log2(histogram[histogram > 0]))
  assert 3 < entropy < 8   # uses many codes, but is far from uniform noise
