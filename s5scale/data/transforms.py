"""What one example is, per data.kind / data.task: the worker-side loaders and the batch layout.

  text  lm        document -> [BOS] tokens [EOS]; packed into rows by packing.py
  audio lm        clip -> mu-law/linear codes; train: one random crop of seq_len + 1 per visit
                  (files of data.long_audio_seconds or more: seeked and decoded crop only,
                  at the file's own level: peak normalization would need the whole file),
                  heldout: the whole clip cut into consecutive windows (covers it exactly once)
  audio classify  clip -> raw waveform of seq_len samples (train: random crop, heldout: the
                  start), zero-padded with mask 0, and the label id of its folder name

Loaders run in grain worker processes, so they are small picklable objects that return either
an example or a bad-data marker. `finalize` runs in the main process on a batch of rows and
returns the dict the trainer consumes (see s5scale/data/__init__.py).
"""

import dataclasses

import numpy as np

from s5scale.data import audio
from s5scale.data import bad_data
from s5scale.data import sources
from s5scale.data import text


def _read(source, index):
  """(payload, None) or (None, marker) when the item cannot be read at all."""
  try:
    return source.read(index), None
  except OSError as error:
    return None, bad_data.marker("bad_files", source.name(index), f"unreadable: {error}")


class TextLoader:
  """Item index -> {"tokens": [BOS] ids [EOS]} or a marker."""
  is_random = False

  def __init__(self, source, tokenizer, jsonl_field: str):
    self._source, self._tokenizer, self._jsonl_field = source, tokenizer, jsonl_field

  def __call__(self, index):
    index = int(index)
    payload, failure = _read(self._source, index)
    if failure:
      return failure
    document = text.parse_document(payload, self._source.name(index),
                                   sources.is_json_line(self._source, index), self._jsonl_field)
    if bad_data.is_marker(document):
      return document
    return text.document_tokens(self._tokenizer, document)


class AudioLoader:
  """Item index (+ rng for random crops) -> an audio row, a whole clip's codes, or a marker."""

  def __init__(self, source, data_config, mode: str, label_ids: dict):
    self._source, self._mode, self._label_ids = source, mode, label_ids
    self._sample_rate, self._seq_len = data_config.sample_rate, data_config.seq_len
    self._quantization, self._bits = data_config.quantization, data_config.bits
    self._long_audio_seconds = data_config.long_audio_seconds
    self.is_random = mode in ("lm_crop", "classify_crop")
    # At a rate whose Nyquist frequency is at or below the cutoff there is nothing to remove
    # (a config trained at 16 kHz with a 4 kHz cutoff, loaded at 8 kHz for zero-shot statistics).
    cutoff_hz = data_config.bandlimit_hz
    self._bandlimit = (data_config.bandlimit_prob, cutoff_hz) if (
        mode == "classify_crop" and 2 * cutoff_hz < self._sample_rate) else (0.0, 0.0)

  def _waveform(self, index):
    payload, failure = _read(self._source, index)
    if failure:
      return None, failure
    if isinstance(payload, np.ndarray):   # procedural corpus: already at the rate, normalized
      return payload, None
    try:
      return audio.load_waveform(payload, self._sample_rate), None
    except audio.UnreadableAudio as error:
      return None, bad_data.marker("bad_files", self._source.name(index), str(error))

  def _long_crop(self, index, length, rng):
    """(crop, None) seeked out of a file of data.long_audio_seconds or more, (None, marker),
    or (None, None) for a short file, which is decoded whole instead."""
    if not (self.is_random and self._long_audio_seconds > 0 and hasattr(self._source, "open")):
      return None, None
    try:
      with self._source.open(index) as stream:
        try:
          sound = audio.open_sound(stream)
        except audio.UnreadableAudio:
          return None, None       # the whole-file path names what is wrong with it
        with sound:
          total = audio.num_samples_at(sound, self._sample_rate)
          if sound.frames < self._long_audio_seconds * sound.samplerate or total <= length:
            return None, None
          start = int(rng.integers(0, total - length + 1))
          return audio.read_crop(sound, start, length, self._sample_rate), None
    except (OSError, audio.UnreadableAudio) as error:
      return None, bad_data.marker("bad_files", self._source.name(index), str(error))

  def __call__(self, index, rng=None):
    index = int(index)
    length = self._seq_len + 1 if self._mode == "lm_crop" else self._seq_len
    crop, failure = self._long_crop(index, length, rng)
    if failure:
      return failure
    if crop is None:
      waveform, failure = self._waveform(index)
      if failure:
        return failure
      if self._mode == "lm_clip":
        tokens = audio.quantize(waveform, self._quantization, self._bits)
        return {"tokens": tokens, "token_bytes": np.ones_like(tokens)}
      start = 0
      if self.is_random and waveform.size > length:
        start = int(rng.integers(0, waveform.size - length + 1))
      crop = waveform[start:start + length]
    valid = np.zeros(length, bool)
    valid[:crop.size] = True
    if self._mode == "lm_crop":
      tokens = np.full(length, audio.silence_code(self._quantization, self._bits), np.int32)
      tokens[:crop.size] = audio.quantize(crop, self._quantization, self._bits)
      is_doc_start = np.zeros(length, bool)
      is_doc_start[0] = True
      return {"tokens": tokens, "token_bytes": valid.astype(np.int32),
              "is_doc_start": is_doc_start, "valid": valid}
    probability, cutoff_hz = self._bandlimit
    if probability and rng.random() < probability:
      # Training clips without the top of the band: a classifier that cannot lean on it keeps
      # its accuracy at a lower sample rate (docs/results.md, "Zero-shot at 8 kHz").
      crop = audio.band_limit(crop, self._sample_rate, cutoff_hz)
    padded = np.zeros(length, np.float32)
    padded[:crop.size] = crop
    return {"waveform": padded, "valid": valid,
            "label": np.int32(self._label_ids[self._source.labels[index]])}


def usable_label(name: str) -> bool:
  """Folders that name a class (Speech Commands keeps noise in _background_noise_)."""
  return bool(name) and not name.startswith(("_", "."))


@dataclasses.dataclass
class Spec:
  """Everything the pipeline needs to know about one data config."""
  data_config: object
  source: object
  usable_indices: np.ndarray
  label_names: list
  tokenizer: object = None

  @property
  def task(self):
    return self.data_config.task

  @property
  def kind(self):
    return self.data_config.kind

  @property
  def pad_id(self) -> int:
    if self.kind == "text":
      return self.tokenizer.pad_id
    return audio.silence_code(self.data_config.quantization, self.data_config.bits)

  def loader(self, train: bool):
    if self.kind == "text":
      return TextLoader(self.source, self.tokenizer, self.data_config.jsonl_field)
    if self.task == "classify":
      mode = "classify_crop" if train else "classify_head"
    else:
      mode = "lm_crop" if train else "lm_clip"
    return AudioLoader(self.source, self.data_config, mode,
                       {name: i for i, name in enumerate(self.label_names)})

  def packing(self, train: bool):
    """How loader outputs become rows: across/within documents, or None (already rows)."""
    if self.kind == "text":
      return "across_documents"
    return None if (self.task == "classify" or train) else "within_documents"

  @property
  def padding_row(self) -> dict:
    seq_len = self.data_config.seq_len
    if self.task == "classify":
      return {"waveform": np.zeros(seq_len, np.float32), "valid": np.zeros(seq_len, bool),
              "label": np.int32(0)}
    return {"tokens": np.full(seq_len + 1, self.pad_id, np.int32),
            "token_bytes": np.zeros(seq_len + 1, np.int32),
            "is_doc_start": np.zeros(seq_len + 1, bool), "valid": np.zeros(seq_len + 1, bool)}

  def finalize(self, batch: dict) -> dict:
    """Rows (B, seq_len + 1) -> the trainer's batch dict (B, seq_len)."""
    if self.task == "classify":
      return {"inputs": batch["waveform"][..., None].astype(np.float32),
              "mask": batch["valid"].astype(np.float32),
              "label": batch["label"].astype(np.int32)}
    tokens, valid, is_doc_start = batch["tokens"], batch["valid"], batch["is_doc_start"]
    targets = tokens[:, 1:]
    # A document's first token is not predictable from the previous document.
    mask = valid[:, 1:] & ~is_doc_start[:, 1:]
    return {"inputs": np.ascontiguousarray(tokens[:, :-1]),
            "targets": np.ascontiguousarray(targets),
            "mask": mask.astype(np.float32),
            "reset": np.ascontiguousarray(is_doc_start[:, :-1]),
            "target_bytes": (batch["token_bytes"][:, 1:] * mask).astype(np.int32)}


def _open(data_config, key: str):
  return sources.open_source(data_config.kind, data_config[key], data_config.sample_rate,
                             data_config.text_extensions, key=f"data.{key}")


def make_spec(data_config, split: str = "train") -> Spec:
  """The spec of data.source, or for split "heldout" with data.heldout_source set, of that
  source, labelled with data.source's classes (the model's head has no others)."""
  explicit = split == "heldout" and data_config.heldout_source
  source = _open(data_config, "heldout_source" if explicit else "source")
  usable = np.arange(len(source))
  label_names = []
  if data_config.kind == "audio":
    train_source = _open(data_config, "source")
    label_names = sorted({name for name in train_source.labels if usable_label(name)})
  if data_config.task == "classify":
    if not label_names:
      raise bad_data.DataError(f"{train_source.description} has no label folders; classification "
                               "expects root/<label>/*.wav (the Speech Commands layout)")
    unknown = {name for name in source.labels if usable_label(name)} - set(label_names)
    if unknown:
      raise bad_data.DataError(f"{source.description} has classes {sorted(unknown)} that "
                               f"{train_source.description} has no folders for")
    usable = np.asarray([i for i, name in enumerate(source.labels) if usable_label(name)])
  tokenizer = text.make_tokenizer(data_config.tokenizer) if data_config.kind == "text" else None
  return Spec(data_config, source, usable, label_names, tokenizer)
