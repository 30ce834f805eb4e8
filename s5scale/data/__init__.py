"""Deterministic, resumable grain pipelines for raw audio and text (the trainer's contract).

  make_iterator(data_config, split, *, process_index=0, process_count=1, num_epochs=None)
      -> grain DatasetIterator: next(), get_state() (JSON-serializable), set_state(state).
      split "train" or "heldout"; batches hold data.batch_size // process_count rows.
      num_epochs=None repeats forever; a finite stream pads its last batch with mask-0 rows,
      and every process gets the same number of held-out batches.
      data.carry_state=True, split "train": row r is a lane streaming whole train items in order,
      cut into consecutive windows (streams.py): global lane j = process_index * B + r takes
      the shuffled items at positions j, j + B', j + 2B', ... (B' = data.batch_size), so the
      global batch at step k is the same for any process count. reset marks each item's start,
      mask is 0 on the target that would cross into the next item. "heldout" is unchanged.
  carried_heldout_iterator(data_config, batch_size, seq_len, *, process_index=0,
                           process_count=1, max_items=None, row_multiple=1) -> LM batches
      each row streams ONE held-out item from its first window (reset[:, 0] True) to its last,
      then padding (mask 0) until the longest item of the group of batch_size items ends; then
      the next group. Every process reads every item and yields the same number of batches.
      Fewer items than rows: the batch shrinks to the fewest multiple of row_multiple (the
      mesh's batch ways) and of process_count that holds them.
  example_batch(data_config, batch_size) -> zero batch dict shaped like make_iterator's
  vocab_size(data_config) -> int
  num_classes(data_config) -> int                  (audio classification: label folders)
  fill_num_classes(config)  model.num_classes from the label folders (0), or checked against them
  bad_data_counts() -> {"bad_files": n, "bad_documents": m}   seen so far in this process
  source_counts() -> {"examples/<name>": n}   examples read per data.mixture source so far
  heldout_splits(data_config) -> ["heldout"] + ["heldout/<name>" per data.mixture source]
  decode_tokens(data_config, tokens) -> str (text) or float32 waveform in [-1, 1] (audio)
  encode_prompt(data_config, prompt) -> int32 tokens (text prefix, or an audio file path)
  DataError: a source with no usable examples (a ValueError; the trainer exits 2).

Batches (NumPy), L = data.seq_len, B = the local batch size:
  language modelling  inputs int32 (B, L), targets int32 (B, L) (inputs shifted by one),
                      mask float32 (B, L) 1 where the target counts, reset bool (B, L) True at
                      each document's first token, target_bytes int32 (B, L) UTF-8 bytes per
                      target (audio: 1 per sample) for bits-per-byte.
  classification      inputs float32 (B, L, 1) waveform, mask float32 (B, L) 1 on real samples
                      (a padding row is all 0), label int32 (B,).
"""

import numpy as np

from s5scale.config_schema import ConfigError
from s5scale.data import audio
from s5scale.data import bad_data
from s5scale.data import mixture
from s5scale.data import text
from s5scale.data import transforms
from s5scale.data.bad_data import DataError
from s5scale.data.pipeline import carried_heldout_iterator
from s5scale.data.pipeline import heldout_splits
from s5scale.data.pipeline import make_iterator

__all__ = ["DataError", "make_iterator", "carried_heldout_iterator", "vocab_size", "num_classes", "fill_num_classes",
           "label_names",
           "bad_data_counts", "source_counts", "heldout_splits", "decode_tokens",
           "encode_prompt", "example_batch"]


def vocab_size(data_config) -> int:
  """2**bits for audio; 260 for the byte tokenizer; the SentencePiece size (+ added specials)."""
  if data_config.kind == "audio":
    return 2**data_config.bits
  return text.make_tokenizer(data_config.tokenizer).vocab_size


def num_classes(data_config) -> int:
  """Number of label folders of an audio source (sorted names -> ids 0..n-1)."""
  names = label_names(data_config)
  if not names:
    raise DataError(f"data.source {data_config.source!r} has no label folders; classification "
                    "expects root/<label>/*.wav (the Speech Commands layout)")
  return len(names)


def fill_num_classes(config) -> None:
  """Classification: model.num_classes=0 becomes the data's label-folder count; any other value
  must equal it (a head of the wrong width would train without error, on the wrong classes)."""
  if config.model.task != "classify":
    return
  found = num_classes(config.data)
  if config.model.num_classes == 0:
    config.model.num_classes = found
  elif config.model.num_classes != found:
    raise ConfigError(f"model.num_classes={config.model.num_classes} but data.source="
                      f"{config.data.source!r} has {found} label folders: "
                      f"{label_names(config.data)}")


def label_names(data_config) -> list[str]:
  """Class names in id order (for reports and confusion matrices)."""
  return transforms.make_spec(data_config).label_names


def example_batch(data_config, batch_size: int) -> dict:
  """Zeros with exactly the keys, shapes and dtypes make_iterator yields for `batch_size` rows.

  Needs no data files: ahead-of-time compilation uses it for configs whose data is elsewhere.
  """
  rows, length = batch_size, data_config.seq_len
  if data_config.task == "classify":
    return {"inputs": np.zeros((rows, length, 1), np.float32),
            "mask": np.zeros((rows, length), np.float32),
            "label": np.zeros((rows,), np.int32)}
  return {"inputs": np.zeros((rows, length), np.int32),
          "targets": np.zeros((rows, length), np.int32),
          "mask": np.zeros((rows, length), np.float32),
          "reset": np.zeros((rows, length), bool),
          "target_bytes": np.zeros((rows, length), np.int32)}


def bad_data_counts() -> dict[str, int]:
  return bad_data.counts()


def source_counts() -> dict[str, int]:
  return mixture.counts()


def decode_tokens(data_config, tokens):
  """Token ids -> str (text; specials dropped) or float32 waveform (audio)."""
  if data_config.kind == "audio":
    return audio.dequantize(np.asarray(tokens), data_config.quantization, data_config.bits)
  return text.make_tokenizer(data_config.tokenizer).decode(tokens)


def encode_prompt(data_config, prompt: str) -> np.ndarray:
  """A text prefix -> [BOS] + ids; an audio file path -> its codes at data.sample_rate."""
  if data_config.kind == "text":
    tokenizer = text.make_tokenizer(data_config.tokenizer)
    return np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt)]).astype(np.int32)
  if not prompt:
    return np.zeros(0, np.int32)
  from etils import epath  # pylint: disable=g-import-not-at-top
  try:
    waveform = audio.load_waveform(epath.Path(prompt).read_bytes(), data_config.sample_rate)
  except (OSError, audio.UnreadableAudio) as error:
    raise DataError(f"prompt audio file {prompt!r} cannot be used: {error}") from None
  return audio.quantize(waveform, data_config.quantization, data_config.bits)
