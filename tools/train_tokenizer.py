"""Train a SentencePiece tokenizer on a sample of any text source, for data.tokenizer.

  python tools/train_tokenizer.py --source=/data/corpus --vocab_size=32000 \
      --output=/data/tok/corpus32k [--model_type=unigram|bpe] [--max_documents=200000]
  python -m s5scale.train ... --config.data.tokenizer=/data/tok/corpus32k.model \
      --config.model.vocab_size=32000

--source takes what data.source takes (a directory, glob, ArrayRecord shards, or '' for the
embedded corpus), with --text_extensions and --jsonl_field. Only the *train* split of
--heldout_fraction (data.heldout_fraction, same hash) is sampled, so held-out metrics stay honest.

The model is lossless, so bits per byte compare with the byte model on the same bytes: no
normalization, whitespace kept as written, every line break a piece of its own, and unseen
characters fall back to UTF-8 byte pieces. Ids 0..3 are <unk>, <s> (BOS), </s> (EOS) and <pad>,
so the vocabulary is exactly --vocab_size. Progress is logged while reading and training.
Exit 2: bad flags, or a source with no usable documents.
"""

import os
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
from etils import epath
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from s5scale.data import bad_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from s5scale.data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position
from s5scale.data import split  # pylint: disable=g-import-not-at-top,wrong-import-position
from s5scale.data import text  # pylint: disable=g-import-not-at-top,wrong-import-position

_SOURCE = flags.DEFINE_string("source", None, "data.source: directory, glob, ArrayRecord "
                              "shards, or '' for the embedded corpus.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output prefix: writes PREFIX.model and "
                              "PREFIX.vocab.", required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 32000, "Pieces, including the 4 specials.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "Algorithm.")
_CHARACTER_COVERAGE = flags.DEFINE_float(
    "character_coverage", 0.9995, "Share of characters given their own piece; the rarest rest "
    "are spelled with byte pieces (use 1.0 for small alphabets).")
_MAX_DOCUMENTS = flags.DEFINE_integer("max_documents", 200000, "Documents sampled (at random, "
                                      "seeded) from the train split; 0 = all.")
_MAX_LINE_BYTES = flags.DEFINE_integer("max_line_bytes", 16384, "Longer lines are skipped by "
                                       "SentencePiece's trainer.")
_HELDOUT_FRACTION = flags.DEFINE_float("heldout_fraction", 0.05, "data.heldout_fraction of the "
                                       "runs that will use the tokenizer.")
_TEXT_EXTENSIONS = flags.DEFINE_string("text_extensions", "", "data.text_extensions.")
_JSONL_FIELD = flags.DEFINE_string("jsonl_field", "text", "data.jsonl_field.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_THREADS = flags.DEFINE_integer("num_threads", os.cpu_count() or 1, "Trainer threads.")

NEWLINE = "\n"


def sample_documents(source, indices: np.ndarray, jsonl_field: str):
  """Yields the decodable documents of `indices`, logging progress every 5 s."""
  start = last_log = time.monotonic()
  read = skipped = 0
  for index in indices:
    try:
      payload = source.read(int(index))
    except OSError:
      skipped += 1
      continue
    document = text.parse_document(payload, source.name(int(index)),
                                   sources.is_json_line(source, int(index)), jsonl_field)
    if bad_data.is_marker(document):
      skipped += 1
      continue
    read += 1
    if time.monotonic() - last_log > 5:
      last_log = time.monotonic()
      logging.info("read %d/%d documents (%.0f/s, %d skipped)", read + skipped, len(indices),
                   (read + skipped) / (last_log - start), skipped)
    yield document
  logging.info("sampled %d documents (%d undecodable or empty skipped)", read, skipped)


def training_lines(documents):
  """SentencePiece trains on lines: each document's non-empty lines, line breaks removed (a line
  break is a user-defined piece, so it still encodes as one token)."""
  for document in documents:
    for line in document.split(NEWLINE):
      if line:
        yield line


def main(argv):
  del argv
  if _VOCAB_SIZE.value < 8 or not 0 < _CHARACTER_COVERAGE.value <= 1 or _MAX_DOCUMENTS.value < 0:
    logging.error("--vocab_size must be >= 8, --character_coverage in (0, 1], "
                  "--max_documents >= 0")
    sys.exit(2)
  try:
    source = sources.open_source("text", _SOURCE.value, 0, _TEXT_EXTENSIONS.value)
    indices = split.split_indices(source.ids, "train", _HELDOUT_FRACTION.value)
  except (bad_data.DataError, ValueError) as error:
    logging.error("%s", error)
    sys.exit(2)
  if _MAX_DOCUMENTS.value and indices.size > _MAX_DOCUMENTS.value:
    rng = np.random.default_rng(_SEED.value)
    indices = np.sort(rng.choice(indices, _MAX_DOCUMENTS.value, replace=False))
  logging.info("training a %s tokenizer of %d pieces on %d documents of %s", _MODEL_TYPE.value,
               _VOCAB_SIZE.value, indices.size, source.description)
  import sentencepiece  # pylint: disable=g-import-not-at-top
  # SentencePiece writes local files only: train into a scratch directory, then copy (gs:// too).
  scratch = tempfile.mkdtemp(prefix="train_tokenizer_")
  local_prefix = os.path.join(scratch, "tokenizer")
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=training_lines(sample_documents(source, indices, _JSONL_FIELD.value)),
        model_prefix=local_prefix, vocab_size=_VOCAB_SIZE.value,
        model_type=_MODEL_TYPE.value, character_coverage=_CHARACTER_COVERAGE.value,
        # Lossless: decode(encode(text)) == text, byte for byte.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, byte_fallback=True, user_defined_symbols=[NEWLINE],
        allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=_MAX_LINE_BYTES.value, input_sentence_size=0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=_THREADS.value,
        minloglevel=0)
  except RuntimeError as error:   # e.g. a vocabulary larger than the sample supports
    logging.error("SentencePiece training failed: %s", error)
    sys.exit(2)
  epath.Path(_OUTPUT.value).parent.mkdir(parents=True, exist_ok=True)
  for suffix in (".model", ".vocab"):
    epath.Path(local_prefix + suffix).copy(epath.Path(_OUTPUT.value + suffix), overwrite=True)
  print(f"wrote {_OUTPUT.value}.model ({_VOCAB_SIZE.value} pieces); train with "
        f"--config.data.tokenizer={_OUTPUT.value}.model "
        f"--config.model.vocab_size={_VOCAB_SIZE.value}")


if __name__ == "__main__":
  app.run(main)
