"""Whole recordings for carried-state lanes (data.carry_state), read a block at a time.

A lane item is one recording, streamed from its first sample to its last:
  - a raw file at data.sample_rate of data.long_audio_seconds or more: read by seeking, one
    block (READ_AHEAD samples, or a window if longer) at a time, so a lane's memory does not
    grow with the file; the peak for normalisation comes from a first pass over the blocks;
  - the chunk records tools/prepare_audio.py cut from one long file ("<file>#00000",
    "<file>#00001", ...): one item, the chunks in order, one chunk decoded at a time, the
    whole file normalised by its peak over all chunks (so the level does not jump at a chunk
    boundary, where there is no reset);
  - anything else (short files, other rates, the procedural corpus): decoded whole, as the
    fresh-window loader does.
Every path gives the codes that peak-normalising the whole recording at once would give, bit for
bit: reading, mono mixing, normalising and quantizing all work sample by sample. Codes are kept
as uint8 (or uint16 beyond 8 bits); the packer copies them into its int32 rows.
"""

import collections
import functools

import numpy as np

from s5scale.data import audio
from s5scale.data import bad_data
from s5scale.data import split

READ_AHEAD = 1 << 18        # samples per block of a long file: 16 s at 16 kHz, 256 KB of codes
_HEAD_BYTES = 1 << 16       # enough of a WAV to find its data chunk (the truncation check)


@functools.lru_cache(maxsize=8)
def recordings(source) -> dict[int, tuple[int, ...]]:
  """{first chunk's index: every chunk's index in chunk order} for each file of `source` that
  tools/prepare_audio.py --chunk_seconds cut into several records."""
  chunks = collections.defaultdict(list)
  for index, item_id in enumerate(source.ids):
    name, number = split.chunk_of(item_id)
    if number is not None:
      chunks[name].append((number, index))
  return {min(found)[1]: tuple(index for _, index in sorted(found))
          for found in chunks.values() if len(found) > 1}


def whole_recordings(source, indices: np.ndarray) -> np.ndarray:
  """`indices` less every chunk but a file's first: one item per recording."""
  later = [index for group in recordings(source).values() for index in group[1:]]
  return indices[~np.isin(indices, np.asarray(later, np.int64))]


class _ChunkSegment:
  """One chunk record, decoded whole (chunks are short) and not normalised."""

  def __init__(self, source, index: int, sample_rate: int):
    self._source, self._index, self._sample_rate = source, index, sample_rate

  def _samples(self) -> np.ndarray:
    waveform, rate = audio.decode(self._source.read(self._index))
    return audio.resample(audio.to_mono(waveform), rate, self._sample_rate)

  def measure(self) -> tuple[int, float]:
    samples = self._samples()
    return samples.size, audio.peak_of(samples)

  def block(self, begin: int, want: int) -> tuple[int, np.ndarray]:
    del begin, want
    return 0, self._samples()


class _FileSegment:
  """A raw file at the target rate, read by seeking."""

  def __init__(self, source, index: int):
    self._source, self._index = source, index
    self._length = 0

  def measure(self) -> tuple[int, float]:
    """(samples, peak) from one pass over the file's blocks, rejecting what decode() would."""
    with self._source.open(self._index) as stream:
      head = stream.read(_HEAD_BYTES)
      size = stream.seek(0, 2)
      stream.seek(0)
      truncation = audio.wav_truncation(head, size)
      if truncation:
        raise audio.UnreadableAudio(f"truncated WAV: {truncation}")
      with audio.open_sound(stream) as sound:
        peak = 0.0
        for begin in range(0, sound.frames, READ_AHEAD):
          block = audio.read_crop(sound, begin, min(READ_AHEAD, sound.frames - begin),
                                  sound.samplerate)
          peak = max(peak, audio.peak_of(block))
        self._length = sound.frames
    return self._length, peak

  def block(self, begin: int, want: int) -> tuple[int, np.ndarray]:
    end = min(self._length, begin + max(want, READ_AHEAD))
    with self._source.open(self._index) as stream, audio.open_sound(stream) as sound:
      return begin, audio.read_crop(sound, begin, end - begin, sound.samplerate)


def code_dtype(bits: int):
  return np.uint8 if bits <= 8 else np.uint16


class StreamedAudio:
  """A recording's codes: len() and contiguous slices like an array, read a block at a time."""

  def __init__(self, segments, quantization: str, bits: int):
    measured = [segment.measure() for segment in segments]
    self._segments = segments
    self._ends = np.cumsum([length for length, _ in measured])
    self._peak = max(peak for _, peak in measured)
    self._codec, self._dtype = (quantization, bits), code_dtype(bits)
    self._cached = (-1, 0, np.zeros(0, self._dtype))   # (segment, first sample, its codes)

  def __len__(self):
    return int(self._ends[-1])

  def __getitem__(self, key: slice) -> np.ndarray:
    start, stop, step = key.indices(len(self))
    if step != 1:
      raise ValueError("StreamedAudio reads contiguous slices only")
    pieces, position = [np.zeros(0, self._dtype)], start
    while position < stop:
      number = int(np.searchsorted(self._ends, position, side="right"))
      first = int(self._ends[number - 1]) if number else 0
      piece = self._codes(number, position - first, stop - position)[:stop - position]
      pieces.append(piece)
      position += piece.size
    return np.concatenate(pieces)

  def _codes(self, number: int, offset: int, want: int) -> np.ndarray:
    """Codes of segment `number` from `offset` on: at least `want` or to the segment's end."""
    cached, begin, codes = self._cached
    length = int(self._ends[number]) - (int(self._ends[number - 1]) if number else 0)
    if cached != number or not begin <= offset < begin + codes.size or (
        begin + codes.size < min(offset + want, length)):
      begin, samples = self._segments[number].block(offset, want)
      codes = audio.quantize(audio.divide_by_peak(samples, self._peak), *self._codec)
      self._cached = (number, begin, codes.astype(self._dtype))
      codes = self._cached[2]
    return codes[offset - begin:]


def _ones(length: int) -> np.ndarray:
  """token_bytes of audio: one per sample, as a view that takes no memory."""
  return np.broadcast_to(np.uint8(1), (length,))


class CarriedAudioLoader:
  """Item index -> {"tokens", "token_bytes"} of one whole recording (module docstring), or a
  bad-data marker. Runs in the main process (lanes use no worker processes)."""
  is_random = False

  def __init__(self, source, data_config, whole_loader):
    self._source, self._whole_loader = source, whole_loader
    self._sample_rate, self._long_seconds = data_config.sample_rate, data_config.long_audio_seconds
    self._codec = (data_config.quantization, data_config.bits)

  def _segments(self, index: int):
    """The pieces to stream, or None to decode the item whole."""
    chunks = recordings(self._source).get(index)
    if chunks:
      return [_ChunkSegment(self._source, chunk, self._sample_rate) for chunk in chunks]
    if self._long_seconds <= 0 or not hasattr(self._source, "open"):
      return None
    with self._source.open(index) as stream:
      try:
        sound = audio.open_sound(stream)
      except audio.UnreadableAudio:
        return None            # the whole-file path names what is wrong with it
      with sound:
        long_enough = sound.frames >= self._long_seconds * sound.samplerate
        return [_FileSegment(self._source, index)] if (
            long_enough and sound.samplerate == self._sample_rate) else None

  def __call__(self, index):
    index = int(index)
    try:
      segments = self._segments(index)
      if segments:
        tokens = StreamedAudio(segments, *self._codec)
        return {"tokens": tokens, "token_bytes": _ones(len(tokens))}
    except (OSError, audio.UnreadableAudio) as error:
      return bad_data.marker("bad_files", self._source.name(index), str(error))
    element = self._whole_loader(index)
    if bad_data.is_marker(element):
      return element
    tokens = element["tokens"].astype(code_dtype(self._codec[1]))
    return {"tokens": tokens, "token_bytes": _ones(tokens.size)}
