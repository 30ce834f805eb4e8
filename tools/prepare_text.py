"""Validate a text source once and write its documents into ArrayRecord shards.

  python tools/prepare_text.py --source=/data/corpus --output=/data/corpus_ar --num_shards=64

Sources: a directory (every non-hidden file, or --text_extensions; a .jsonl file gives one
document per line, its text in --jsonl_field) or a glob. Each record is one
document's UTF-8 text (tokenization stays in the pipeline, so data.tokenizer can change).
Undecodable and empty documents are skipped and named in the log. `<shard>.json` lists the
document ids, so the held-out split matches the raw source. Progress and ETA are logged;
re-running resumes, skipping complete shards. Exit 2: bad flags or a source with no text.
"""

import functools
import os
import sys

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from s5scale.data import bad_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from s5scale.data import shards  # pylint: disable=g-import-not-at-top,wrong-import-position
from s5scale.data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position

_SOURCE = flags.DEFINE_string("source", None, "Directory or glob of text files "
                              "('' = the Python standard library).", required=True)
_TEXT_EXTENSIONS = flags.DEFINE_string("text_extensions", "", "Directory files to take, e.g. "
                                       "'.txt,.md' ('' = every non-hidden file).")
_JSONL_FIELD = flags.DEFINE_string("jsonl_field", "text", "JSON key of each .jsonl document.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory for the shards.", required=True)
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 0, "Number of shards (0: one per 4096 docs).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Processes.")


def main(argv):
  del argv
  if _NUM_SHARDS.value < 0 or _NUM_WORKERS.value < 1:
    logging.error("--num_workers must be positive and --num_shards >= 0")
    sys.exit(2)
  try:
    source = sources.open_source("text", _SOURCE.value, 0, _TEXT_EXTENSIONS.value)
  except bad_data.DataError as error:
    logging.error("%s", error)
    sys.exit(2)
  num_shards = _NUM_SHARDS.value or max(1, -(-len(source) // 4096))
  encode = functools.partial(shards.text_record, jsonl_field=_JSONL_FIELD.value)
  summary = shards.write_shards(source, encode, _OUTPUT.value, num_shards,
                                _NUM_WORKERS.value)
  logging.info("done: %s -> %s", summary, _OUTPUT.value)
  print(f"wrote {summary['written']} documents to {num_shards} shards in {_OUTPUT.value} "
        f"({summary['skipped']} bad documents skipped, {summary['shards_reused']} shards reused)")


if __name__ == "__main__":
  app.run(main)
