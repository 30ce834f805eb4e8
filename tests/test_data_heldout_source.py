"""data.heldout_source names the held-out data (read whole; train then reads all of data.source),
and a single file (.txt, .jsonl, .parquet, audio) is a valid data.source.

Oracle: the files written here, read back from disk (and parsed with json / pyarrow) by this test.
"""

import json

import numpy as np
import pytest
import soundfile

from s5scale import data
from s5scale import defaults
from tests import helpers

BOS, EOS, PAD = 257, 258, 256     # the byte tokenizer's specials (s5scale/data/text.py)
TRAIN_TEXTS = {f"train_{i}.txt": f"training file {i}: naïve café {'ß' * i}\n" for i in range(6)}
VALIDATION_TEXT = "validation: Ωmega ∑ sums, \"quotes\"\nand a second line\n" * 3


def _config(source, heldout_source="", **overrides):
  config = defaults.base_config().data
  # heldout_fraction near 1: a hash split would keep almost nothing for training.
  config.update(dict(kind="text", source=str(source), heldout_source=str(heldout_source),
                     batch_size=2, seq_len=32, heldout_fraction=0.9, num_workers=0))
  config.update(overrides)
  return config


def _documents(config, split) -> list[str]:
  """The documents of one epoch of `split`, in stream order: the token stream cut at BOS."""
  stream = []
  for batch in data.make_iterator(config, split, num_epochs=1):
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      row = list(inputs) + [targets[-1]]
      stream += row if not stream else row[1:]   # rows overlap by one token
  documents, current = [], None
  for token in stream:
    if token == BOS:
      current = bytearray()
      documents.append(current)
    elif token < 256:
      current.append(token)
  return [bytes(document).decode("utf-8") for document in documents]


def _write_texts(folder):
  folder.mkdir()
  for name, text in TRAIN_TEXTS.items():
    (folder / name).write_text(text, encoding="utf-8")


def test_heldout_scores_exactly_the_named_file_and_train_reads_every_file(tmp_path):
  _write_texts(tmp_path / "corpus")
  validation = tmp_path / "valid.txt"
  validation.write_text(VALIDATION_TEXT, encoding="utf-8")
  config = _config(tmp_path / "corpus", validation)
  # [BOS] bytes [EOS]: the BOS target is masked (nothing predicts a document's first token),
  # the EOS carries 0 bytes, and every byte is a target once: the file's size, counted on disk.
  scored = sum(int(batch["target_bytes"].sum())
               for batch in data.make_iterator(config, "heldout", num_epochs=1))
  assert scored == len(validation.read_bytes())
  assert _documents(config, "heldout") == [validation.read_text(encoding="utf-8")]
  on_disk = sorted((tmp_path / "corpus" / name).read_text(encoding="utf-8")
                   for name in TRAIN_TEXTS)
  assert sorted(_documents(config, "train")) == on_disk
  # Control: the same fraction's hash split does hold training files back.
  assert len(_documents(_config(tmp_path / "corpus"), "train")) < len(on_disk)


def _write_jsonl(path, texts):
  lines = [json.dumps({"text": text, "id": i}) for i, text in enumerate(texts)]
  path.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n", encoding="utf-8")  # a blank


def _jsonl_texts(path) -> list[str]:
  return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()
          if line.strip()]


def test_a_single_jsonl_file_gives_one_document_per_line(tmp_path):
  train, heldout = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
  _write_jsonl(train, [f"line {i} with\nan escaped newline é{i}" for i in range(7)])
  _write_jsonl(heldout, ["held out one", "held out two ∑"])
  config = _config(train, heldout)
  assert sorted(_documents(config, "train")) == sorted(_jsonl_texts(train))
  assert _documents(config, "heldout") == _jsonl_texts(heldout)


@pytest.mark.slow
def test_a_single_jsonl_file_trains_end_to_end(tmp_path):
  train, heldout = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
  _write_jsonl(train, [f"document {i}: " + "some text " * i for i in range(20)])
  _write_jsonl(heldout, ["a held-out document", "another held-out document"])
  workdir = tmp_path / "w"
  result = helpers.run("train", "text_small.py", workdir, helpers.overrides(
      train__num_steps=2, eval__every_steps=2, data__source=str(train),
      data__heldout_source=str(heldout)), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert [r["step"] for r in helpers.read_jsonl(workdir / "metrics.jsonl")][-1] == 2
  evaluated = helpers.read_jsonl(workdir / "eval" / "metrics.jsonl")[-1]
  assert evaluated["heldout/num_bytes"] == sum(len(t.encode()) for t in _jsonl_texts(heldout))


def test_a_single_text_file_and_a_single_parquet_file(tmp_path):
  pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
  import pyarrow  # pylint: disable=import-outside-toplevel
  _write_texts(tmp_path / "corpus")
  one_file = tmp_path / "corpus" / "train_3.txt"
  validation = tmp_path / "valid.txt"
  validation.write_text(VALIDATION_TEXT, encoding="utf-8")
  assert _documents(_config(one_file, validation), "train") == [one_file.read_text("utf-8")]
  rows = [f"parquet row {i} ü" for i in range(9)]
  parquet = tmp_path / "rows.parquet"
  pyarrow_parquet.write_table(pyarrow.table({"text": rows}), parquet, row_group_size=4)
  texts_on_disk = pyarrow_parquet.read_table(parquet).column("text").to_pylist()
  assert sorted(_documents(_config(parquet, validation), "train")) == sorted(texts_on_disk)
  assert _documents(_config(validation, parquet), "heldout") == texts_on_disk


def test_a_single_audio_file_as_source_and_heldout_source(tmp_path):
  rate = 4000
  tone = 0.5 * np.sin(np.arange(rate // 4) * 0.3)
  for name in ("train.wav", "valid.wav"):
    soundfile.write(tmp_path / name, tone, rate, subtype="PCM_16")
  config = _config(tmp_path / "train.wav", tmp_path / "valid.wav", kind="audio",
                   sample_rate=rate, seq_len=64)
  # Every sample is a target once, except the clip's first (nothing before it predicts it).
  scored = sum(int(batch["target_bytes"].sum())
               for batch in data.make_iterator(config, "heldout", num_epochs=1))
  assert scored == soundfile.info(tmp_path / "valid.wav").frames - 1
  assert next(data.make_iterator(config, "train"))["inputs"].shape == (2, 64)


def test_a_missing_path_is_a_data_error_naming_it(tmp_path):
  _write_texts(tmp_path / "corpus")
  missing = tmp_path / "no_such_valid.jsonl"
  with pytest.raises(data.DataError, match="data.heldout_source") as error:
    data.make_iterator(_config(tmp_path / "corpus", missing), "heldout", num_epochs=1)
  assert str(missing) in str(error.value)
  with pytest.raises(data.DataError, match="data.source") as error:
    data.make_iterator(_config(missing), "train")
  assert str(missing) in str(error.value)


def test_heldout_source_with_a_mixture_is_refused(tmp_path):
  _write_texts(tmp_path / "corpus")
  mixture = f"a={tmp_path}/corpus/train_1.txt:1,b={tmp_path}/corpus/train_2.txt:1"
  with pytest.raises(ValueError, match="data.mixture.*data.heldout_source"):
    data.make_iterator(_config("", tmp_path / "corpus", mixture=mixture), "heldout")


def test_classification_heldout_source_keeps_the_training_classes(tmp_path):
  for name in ("train", "valid", "unknown_class"):
    helpers.speech_commands_tree(tmp_path / name)
  config = _config(tmp_path / "train", tmp_path / "valid", kind="audio", task="classify",
                   sample_rate=helpers.SAMPLE_RATE, seq_len=64)
  labels = [label for batch in data.make_iterator(config, "heldout", num_epochs=1)
            for label, mask in zip(batch["label"], batch["mask"]) if mask.any()]
  words = sorted(helpers.WORDS)      # class ids: the training folders in sorted order
  on_disk = [words.index(word) for word in words for _ in (tmp_path / "valid" / word).iterdir()]
  assert sorted(labels) == sorted(on_disk)
  (tmp_path / "unknown_class" / "middle").mkdir()
  soundfile.write(tmp_path / "unknown_class" / "middle" / "a.wav", np.zeros(400),
                  helpers.SAMPLE_RATE)
  config.heldout_source = str(tmp_path / "unknown_class")
  with pytest.raises(data.DataError, match="middle"):
    data.make_iterator(config, "heldout", num_epochs=1)
