"""Text documents -> token ids: the byte tokenizer (default, no files needed) or SentencePiece.

Every document becomes [BOS] + tokens + [EOS]. The model resets its state at BOS (the packer
marks it), and the EOS lets a sampler stop. Each token also carries the number of the document's
UTF-8 bytes it accounts for (0 for specials), summing exactly to the document's size, so bits
per byte are comparable across tokenizers.
"""

import functools
import json

import numpy as np

from s5scale.data import bad_data

# Byte tokenizer ids: 0..255 are the bytes themselves, then the specials.
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
RESERVED_ID = 259            # unused; keeps the vocabulary at 260 (configs/text_small.py)
BYTES_VOCAB_SIZE = 260


class ByteTokenizer:
  """UTF-8 bytes as ids; vocab 260 = 256 bytes + PAD, BOS, EOS, one reserved."""
  vocab_size = BYTES_VOCAB_SIZE
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    ids = self.encode(text)
    return ids, np.ones_like(ids)

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    return bytes(ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tolist()).decode(
        "utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model by path. PAD/BOS/EOS come from the model, or are appended after it."""

  def __init__(self, model_path: str):
    self.model_path = model_path
    processor = self._processor
    size = processor.get_piece_size()
    appended = iter(range(size, size + 3))
    self.bos_id = processor.bos_id() if processor.bos_id() >= 0 else next(appended)
    self.eos_id = processor.eos_id() if processor.eos_id() >= 0 else next(appended)
    self.pad_id = processor.pad_id() if processor.pad_id() >= 0 else next(appended)
    self.piece_count = size
    self.vocab_size = max(size, self.bos_id + 1, self.eos_id + 1, self.pad_id + 1)

  @functools.cached_property
  def _processor(self):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    from etils import epath  # pylint: disable=g-import-not-at-top
    try:
      return sentencepiece.SentencePieceProcessor(
          model_proto=epath.Path(self.model_path).read_bytes())
    except (OSError, RuntimeError) as error:
      raise ValueError(f"data.tokenizer {self.model_path!r} is not a readable SentencePiece "
                       f"model: {error}") from None

  def __getstate__(self):
    # Workers reload the model from its path instead of pickling the C++ object.
    state = self.__dict__.copy()
    state.pop("_processor", None)
    return state

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._processor.encode(text), dtype=np.int32)

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)
           if 0 <= i < self.piece_count and i not in (self.bos_id, self.eos_id, self.pad_id)]
    return self._processor.decode(ids)

  def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Ids, and the input bytes each piece ends: from the previous piece's end to its own.

    Piece surfaces are byte spans of the input; whitespace the normalizer dropped falls in the
    gaps, so it is charged to the next piece (the last piece takes the tail) and the counts sum
    to len(text.encode()) exactly.
    """
    pieces = self._processor.encode(text, out_type="proto").pieces
    ids = np.asarray([piece.id for piece in pieces], np.int32)
    ends = np.asarray([piece.end for piece in pieces], np.int64)
    if ends.size:
      ends[-1] = len(text.encode("utf-8"))
    return ids, np.diff(ends, prepend=0).astype(np.int32)


@functools.lru_cache(maxsize=4)
def make_tokenizer(tokenizer: str):
  """data.tokenizer: "bytes" or a path to a SentencePiece .model file."""
  if tokenizer == "bytes":
    return ByteTokenizer()
  return SentencePieceTokenizer(tokenizer)


def parse_document(payload: bytes, item_id: str, is_jsonl: bool, jsonl_field: str = "text"):
  """Raw item bytes -> document text, or a bad-data marker (undecodable UTF-8, bad JSON, empty).

  A JSON line's text is its `jsonl_field` (data.jsonl_field); a line that is a bare JSON string
  is the text itself.
  """
  try:
    text = payload.decode("utf-8")
  except UnicodeDecodeError as error:
    return bad_data.marker("bad_documents", item_id,
                           f"not valid UTF-8 ({error.reason} at byte {error.start})")
  if is_jsonl:
    try:
      record = json.loads(text)
    except json.JSONDecodeError as error:
      return bad_data.marker("bad_documents", item_id, f"not a JSON line: {error}")
    text = record.get(jsonl_field) if isinstance(record, dict) else record
    if not isinstance(text, str):
      return bad_data.marker("bad_documents", item_id, f"no string {jsonl_field!r} field")
  if not text.strip():
    return bad_data.marker("bad_documents", item_id, "empty document")
  return text


def document_tokens(tokenizer, text: str) -> dict:
  """{"tokens": [BOS] + ids + [EOS], "token_bytes": 0, bytes per id, 0}, int32 (n + 2,) each."""
  ids, byte_counts = tokenizer.encode_with_bytes(text)
  return {"tokens": np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]).astype(np.int32),
          "token_bytes": np.concatenate([[0], byte_counts, [0]]).astype(np.int32)}
