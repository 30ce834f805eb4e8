"""Waveform transforms: decode → mono → resample → peak-normalize → quantize, and their inverses.

Waveforms are float32 NumPy arrays of shape (num_samples,) in [-1, 1]. Tokens are int32 in
[0, 2**bits). Everything here is a pure function so the grain workers can call it on any item.
"""

import io
import math
import re
import struct

import numpy as np
import soundfile

from s5scale.choices import QUANTIZATIONS


class UnreadableAudio(ValueError):
  """The bytes are not a complete audio file (the message says why)."""


def wav_truncation(payload: bytes, size: int | None = None) -> str | None:
  """Why a RIFF/WAVE payload is cut short, or None when it is whole (or not a WAV at all).

  libsndfile silently returns the frames that exist in a truncated WAV, so a half-copied file
  would otherwise train as a short clip; the data chunk's declared size gives it away.
  payload may be the file's head alone when `size` gives the whole file's length in bytes.
  """
  size = len(payload) if size is None else size
  if len(payload) < 12 or payload[:4] != b"RIFF" or payload[8:12] != b"WAVE":
    return None
  position = 12
  while position + 8 <= len(payload):
    chunk_id = payload[position:position + 4]
    (chunk_size,) = struct.unpack("<I", payload[position + 4:position + 8])
    available = size - (position + 8)
    if chunk_id == b"data":
      # Writers streaming to a pipe cannot seek back, so they leave 0 or a huge placeholder
      # (espeak-ng: 0x7FFFF000, others 0xFFFFFFFF); nothing to check then.
      if 0 < chunk_size < 0x7FFFF000 and chunk_size > available:
        return f"data chunk declares {chunk_size} bytes but only {available} are present"
      return None
    position += 8 + chunk_size + (chunk_size & 1)
  # A head that ends before the data chunk says nothing; libsndfile judges the rest.
  return "no data chunk before the end of the file" if len(payload) == size else None


def decode(payload: bytes) -> tuple[np.ndarray, int]:
  """Audio file bytes (WAV/FLAC/OGG/...) -> (float32 (num_samples, channels), sample_rate)."""
  truncation = wav_truncation(payload)
  if truncation:
    raise UnreadableAudio(f"truncated WAV: {truncation}")
  if not payload:
    raise UnreadableAudio("empty file (0 bytes)")
  try:
    waveform, sample_rate = soundfile.read(io.BytesIO(payload), dtype="float32", always_2d=True)
  except (soundfile.SoundFileError, RuntimeError, EOFError) as error:
    raise undecodable(error) from None
  if waveform.shape[0] == 0:
    raise UnreadableAudio("no samples")
  if not np.all(np.isfinite(waveform)):
    raise UnreadableAudio("non-finite samples")
  return waveform, int(sample_rate)


def to_mono(waveform: np.ndarray) -> np.ndarray:
  """(num_samples, channels) -> (num_samples,) channel mean."""
  return waveform.mean(axis=1, dtype=np.float32) if waveform.ndim == 2 else waveform


def resample(waveform: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
  """Band-limited polyphase resampling of (num_samples,) float32 from source_rate to target_rate.

  scipy's resample_poly applies a Kaiser-windowed low-pass at the lower of the two Nyquist
  frequencies, so content above the new Nyquist is removed instead of aliased.
  """
  if source_rate == target_rate:
    return waveform.astype(np.float32, copy=False)
  from scipy import signal  # pylint: disable=g-import-not-at-top  # slow import; rarely needed
  divisor = math.gcd(int(source_rate), int(target_rate))
  up, down = int(target_rate) // divisor, int(source_rate) // divisor
  return signal.resample_poly(waveform.astype(np.float32), up, down).astype(np.float32)


def band_limit(waveforms: np.ndarray, sample_rate: int, cutoff_hz: float, axis: int = -1):
  """Removes content above cutoff_hz exactly as a round trip through a 2·cutoff_hz rate does.

  Resampling down to 2·cutoff_hz and back up applies `resample`'s own anti-aliasing low-pass, so
  a clip keeps what the same clip loaded at the lower rate carries, still at sample_rate. Length
  along `axis` is kept. float32 out.
  """
  from scipy import signal  # pylint: disable=g-import-not-at-top  # slow import; rarely needed
  low_rate = int(round(2 * cutoff_hz))
  if not 0 < low_rate < sample_rate:
    raise ValueError(f"cutoff {cutoff_hz} Hz must be between 0 and the Nyquist frequency "
                     f"{sample_rate / 2} Hz")
  divisor = math.gcd(int(sample_rate), low_rate)
  up, down = low_rate // divisor, int(sample_rate) // divisor
  low = signal.resample_poly(np.asarray(waveforms, np.float32), up, down, axis=axis)
  back = signal.resample_poly(low, down, up, axis=axis)
  length = np.shape(waveforms)[axis]
  return np.take(back, np.arange(length), axis=axis).astype(np.float32)


def peak_normalize(waveform: np.ndarray) -> np.ndarray:
  """Scales so max |sample| is 1; an all-silent clip stays silent."""
  return divide_by_peak(waveform, peak_of(waveform))


def peak_of(waveform: np.ndarray) -> float:
  """max |sample| (0 for no samples); the max of the blocks' peaks is the whole file's."""
  return float(np.max(np.abs(waveform))) if waveform.size else 0.0


def divide_by_peak(waveform: np.ndarray, peak: float) -> np.ndarray:
  """waveform / peak as float32, sample by sample (so a block gives its slice of the whole)."""
  if peak == 0.0:
    return waveform.astype(np.float32, copy=False)
  return (waveform / peak).astype(np.float32)


def load_waveform(payload: bytes, target_rate: int) -> np.ndarray:
  """Audio file bytes -> peak-normalized mono float32 (num_samples,) at target_rate."""
  waveform, sample_rate = decode(payload)
  return peak_normalize(resample(to_mono(waveform), sample_rate, target_rate))


def open_sound(stream) -> soundfile.SoundFile:
  """A seekable file object (or bytes) -> an open soundfile reader; UnreadableAudio if it isn't
  audio. Only the header is read: frames and samplerate are known without decoding."""
  try:
    return soundfile.SoundFile(io.BytesIO(stream) if isinstance(stream, bytes) else stream)
  except (soundfile.SoundFileError, RuntimeError, EOFError) as error:
    raise undecodable(error) from None


def undecodable(error: Exception) -> UnreadableAudio:
  """soundfile's message without the in-memory stream's repr ("Error opening <_io.BytesIO object
  at 0x...>"): the bad-data log already names the file."""
  message = re.sub(r"<_io\.\w+ object at 0x[0-9a-f]+>", "the file", str(error))
  return UnreadableAudio(f"not decodable audio: {message}")


def num_samples_at(sound: soundfile.SoundFile, target_rate: int) -> int:
  """How many samples the whole file has once resampled to target_rate."""
  return sound.frames * target_rate // sound.samplerate


def read_crop(sound: soundfile.SoundFile, start: int, length: int, target_rate: int,
              margin: int = 64) -> np.ndarray:
  """Samples [start, start + length) of the file at target_rate, mono float32, not normalized.

  Seeks to the crop and decodes only it (plus `margin` frames each side for the resampling
  filter), so a crop of an hour-long FLAC costs what a crop of a short one does. At the file's
  own rate it equals the same slice of a full decode exactly; at another rate it matches a
  full-file resample up to the filter's edge and a sub-sample phase.
  """
  rate = sound.samplerate
  if rate == target_rate:
    begin, end, offset = start, start + length, 0
  else:
    begin = max(0, start * rate // target_rate - margin)
    end = min(sound.frames, -(-(start + length) * rate // target_rate) + margin)
    offset = start - begin * target_rate // rate
  try:
    sound.seek(begin)
    frames = sound.read(end - begin, dtype="float32", always_2d=True)
  except (soundfile.SoundFileError, RuntimeError, EOFError) as error:
    raise UnreadableAudio(f"cannot read samples {begin}..{end}: {error}") from None
  if frames.shape[0] < end - begin:
    raise UnreadableAudio(f"file ends at frame {begin + frames.shape[0]}, header says "
                          f"{sound.frames}")
  waveform = resample(to_mono(frames), rate, target_rate)[offset:offset + length]
  if not np.all(np.isfinite(waveform)):
    raise UnreadableAudio(f"non-finite samples in {begin}..{end}")
  return waveform


def mulaw_encode(waveform: np.ndarray, bits: int = 8) -> np.ndarray:
  """float (...,) in [-1, 1] -> int32 (...,) codes in [0, 2**bits − 1], μ = 2**bits − 1."""
  mu = 2**bits - 1
  clipped = np.clip(waveform, -1.0, 1.0).astype(np.float64)
  companded = np.sign(clipped) * np.log1p(mu * np.abs(clipped)) / math.log1p(mu)
  return np.floor((companded + 1) / 2 * mu + 0.5).astype(np.int32)


def mulaw_decode(codes: np.ndarray, bits: int = 8) -> np.ndarray:
  """int (...,) codes -> float32 (...,) waveform, the inverse of mulaw_encode up to quantization."""
  mu = 2**bits - 1
  companded = 2 * np.asarray(codes, np.float64) / mu - 1
  return (np.sign(companded) * np.expm1(np.abs(companded) * math.log1p(mu)) / mu).astype(
      np.float32)


def linear_encode(waveform: np.ndarray, bits: int = 8) -> np.ndarray:
  """float (...,) in [-1, 1] -> int32 (...,) uniform codes in [0, 2**bits − 1]."""
  levels = 2**bits - 1
  clipped = np.clip(waveform, -1.0, 1.0).astype(np.float64)
  return np.floor((clipped + 1) / 2 * levels + 0.5).astype(np.int32)


def linear_decode(codes: np.ndarray, bits: int = 8) -> np.ndarray:
  """int (...,) codes -> float32 (...,) waveform."""
  return (2 * np.asarray(codes, np.float64) / (2**bits - 1) - 1).astype(np.float32)


# data.quantization -> (encode, decode)
CODECS = {"mulaw": (mulaw_encode, mulaw_decode), "linear": (linear_encode, linear_decode)}


def quantize(waveform: np.ndarray, method: str, bits: int) -> np.ndarray:
  """float waveform -> int codes by data.quantization ("mulaw" or "linear")."""
  return _codec(method)[0](waveform, bits)


def dequantize(codes: np.ndarray, method: str, bits: int) -> np.ndarray:
  """Inverse of quantize, float32 in [-1, 1]."""
  return _codec(method)[1](codes, bits)


def _codec(method: str):
  if method not in CODECS:
    raise ValueError(f"data.quantization must be one of {QUANTIZATIONS}, got {method!r}")
  return CODECS[method]


def silence_code(method: str, bits: int) -> int:
  """The code of a zero sample: the value padding positions carry (their mask is 0)."""
  return int(quantize(np.zeros(1), method, bits)[0])


def encode_wav_bytes(waveform: np.ndarray, sample_rate: int) -> bytes:
  """(num_samples,) float32 -> 16-bit PCM WAV file bytes (the record format of prepare_audio)."""
  buffer = io.BytesIO()
  soundfile.write(buffer, np.clip(waveform, -1.0, 1.0), sample_rate, format="WAV",
                  subtype="PCM_16")
  return buffer.getvalue()
