"""tools/train_tokenizer.py: a lossless SentencePiece model for data.tokenizer.

Oracles: held-out standard-library files read from disk (chosen by the SHA-1 rule written out
here), and the byte model's own eval run on the same split.
"""

import hashlib
import os
import subprocess
import sys
import sysconfig

import pytest

from tests import helpers

TOOL = os.path.join(helpers.REPO, "tools", "train_tokenizer.py")
VOCAB_SIZE = 400
EVAL_HELDOUT_FRACTION = 0.002     # two stdlib files: a full-split eval in seconds


def _heldout_stdlib_files(fraction: float) -> dict[str, str]:
  """{relpath: text} of the stdlib .py files the split puts in held-out, valid UTF-8, non-blank."""
  root = sysconfig.get_paths()["stdlib"]
  chosen = {}
  for directory, subdirectories, files in os.walk(root):
    subdirectories[:] = [d for d in subdirectories
                         if d not in ("site-packages", "dist-packages", "__pycache__")]
    for name in files:
      relpath = os.path.normpath(os.path.join(os.path.relpath(directory, root), name))
      score = int.from_bytes(hashlib.sha1(relpath.encode()).digest()[:8], "big") / 2**64
      if name.endswith(".py") and score < fraction:
        try:
          text = open(os.path.join(directory, name), encoding="utf-8").read()
        except UnicodeDecodeError:
          continue
        if text.strip():
          chosen[relpath] = text
  return chosen


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  prefix = tmp_path_factory.mktemp("tokenizer") / "stdlib"
  result = subprocess.run(
      [sys.executable, TOOL, "--source=", f"--vocab_size={VOCAB_SIZE}", "--max_documents=60",
       f"--output={prefix}", "--num_threads=2"],
      capture_output=True, text=True, timeout=600, env=helpers.env_for(), cwd=helpers.REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "sampled 6" in result.stderr or "sampled 5" in result.stderr   # progress is logged
  return f"{prefix}.model"


def test_the_tokenizer_round_trips_heldout_text_exactly(tokenizer):
  import sentencepiece  # pylint: disable=import-outside-toplevel
  processor = sentencepiece.SentencePieceProcessor(model_file=tokenizer)
  assert processor.get_piece_size() == VOCAB_SIZE
  heldout = _heldout_stdlib_files(0.05)
  assert len(heldout) > 50
  for relpath in sorted(heldout)[:40]:
    text = heldout[relpath]
    ids = processor.encode(text)
    assert len(ids) < len(text.encode())          # it does merge bytes into pieces
    assert processor.decode(ids) == text, relpath
  mixed = "\tindent  kept\r\n\n  é 漢字 🙂 ∑ \x00 end"
  assert processor.decode(processor.encode(mixed)) == mixed


def _eval_record(workdir, tokenizer_flags):
  result = helpers.run("train", "text_small.py", workdir, helpers.overrides(
      train__num_steps=1, optim__warmup_steps=1, eval__every_steps=1, eval__max_batches=0,
      eval__seq_len=512, eval__compressor_baselines=False, data__heldout_fraction=EVAL_HELDOUT_FRACTION,
      checkpoint__every_steps=100, **tokenizer_flags), timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  (record,) = [r for r in helpers.read_jsonl(workdir / "eval" / "metrics.jsonl")
               if r["split"] == "heldout"]
  return record


@pytest.mark.slow
def test_a_text_small_run_with_it_scores_the_same_bytes_as_the_byte_model(tokenizer, tmp_path):
  byte_record = _eval_record(tmp_path / "bytes", {})
  piece_record = _eval_record(tmp_path / "pieces", dict(data__tokenizer=tokenizer,
                                                       model__vocab_size=VOCAB_SIZE))
  expected_bytes = sum(len(t.encode()) for t in _heldout_stdlib_files(EVAL_HELDOUT_FRACTION)
                       .values())
  assert byte_record["heldout/num_bytes"] == piece_record["heldout/num_bytes"] == expected_bytes
  # Fewer tokens carry those bytes.
  assert piece_record["heldout/num_predictions"] < byte_record["heldout/num_predictions"]
  assert 0 < piece_record["heldout/bits_per_byte"] < 16
