"""Text sources of any file type: a directory takes every non-hidden file (or
data.text_extensions), binary files are skipped and counted, .jsonl lines give data.jsonl_field,
and an empty source says what was looked for and suggests a glob.

Oracle: the files written here, read back from disk by this test.
"""

import json
import math

import pytest

from s5scale import data
from s5scale import defaults
from tests import helpers

# A PNG header and bytes that are not UTF-8 anywhere.
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(128, 256)) * 4


def _mixed_directory(root):
  """Python, Markdown and extension-less text files, a hidden file and one binary file."""
  documents = {
      "pkg/module.py": "def greet(name):\n  return f'hello {name}'\n",
      "docs/guide.md": "# Guide\n\nUse *s5scale* to pretrain.\n",
      "Makefile": "train:\n\tpython -m s5scale.train\n",
      "pkg/LICENSE": "Permission is hereby granted, free of charge.\n",
  }
  for relpath, text in documents.items():
    (root / relpath).parent.mkdir(parents=True, exist_ok=True)
    (root / relpath).write_text(text)
  (root / ".hidden_notes").write_text("tool state, not corpus")
  (root / "docs" / "logo.png").write_bytes(BINARY)
  return documents


def _config(source, **overrides):
  config = defaults.base_config().data
  config.update(dict(kind="text", source=str(source), batch_size=2, seq_len=64, seed=0,
                     heldout_fraction=0.999999, num_workers=0, read_threads=2))
  config.update(overrides)
  return config


def _documents_read(config) -> set[str]:
  """Every held-out document the pipeline yields, cut at BOS/EOS and decoded from bytes."""
  stream = []
  for batch in data.make_iterator(config, "heldout", num_epochs=1):
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      row = list(inputs) + [targets[-1]]
      stream += row if not stream else row[1:]
  text = bytes(t if t < 256 else 0 for t in stream if t != 256).decode()
  return {piece for piece in text.split("\0") if piece}


def test_a_directory_takes_every_file_and_skips_and_counts_a_binary_one(tmp_path, caplog):
  documents = _mixed_directory(tmp_path)
  before = data.bad_data_counts()["bad_documents"]
  with caplog.at_level("WARNING"):
    assert _documents_read(_config(tmp_path)) == set(documents.values())
  assert data.bad_data_counts()["bad_documents"] - before == 1
  assert sum("logo.png" in record.getMessage() for record in caplog.records) == 1


def test_text_extensions_restricts_the_files(tmp_path):
  documents = _mixed_directory(tmp_path)
  assert _documents_read(_config(tmp_path, text_extensions=".md, py")) == {
      documents["docs/guide.md"], documents["pkg/module.py"]}


def test_jsonl_field_picks_the_field_beside_plain_files(tmp_path):
  lines = [{"body": "first body", "text": "decoy one"}, {"text": "decoy without a body"},
           {"body": "second body", "text": "decoy two"}]
  (tmp_path / "records.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
  (tmp_path / "plain.txt").write_text("a whole plain file")
  before = data.bad_data_counts()["bad_documents"]
  assert _documents_read(_config(tmp_path, jsonl_field="body")) == {
      "first body", "second body", "a whole plain file"}
  assert data.bad_data_counts()["bad_documents"] - before == 1   # the line with no "body"
  assert _documents_read(_config(tmp_path)) == {
      "decoy one", "decoy without a body", "decoy two", "a whole plain file"}


def test_an_empty_text_source_names_what_was_looked_for_and_suggests_a_glob(tmp_path):
  (tmp_path / "only.bin").write_bytes(BINARY)
  with pytest.raises(data.DataError) as error:
    data.make_iterator(_config(tmp_path, text_extensions=".txt"), "train")
  message = str(error.value)
  assert str(tmp_path) in message and ".txt" in message and "glob" in message
  assert f"{tmp_path}/**/*.txt" in message and "text_extensions" in message


@pytest.mark.slow
def test_a_directory_of_code_and_prose_trains(tmp_path):
  _mixed_directory(tmp_path / "corpus")
  workdir = tmp_path / "run"
  result = helpers.run("train", "text_small.py", workdir, helpers.overrides(
      data__source=str(tmp_path / "corpus"), data__heldout_fraction=0.0, train__num_steps=3,
      eval__every_steps=0, checkpoint__every_steps=100), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  records = helpers.read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in records][-1] == 3
  assert all(math.isfinite(r["loss"]) for r in records)
  assert records[-1]["data/bad_documents"] == 1


def test_parquet_rows_are_documents_from_the_jsonl_field(tmp_path):
  pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
  import pyarrow  # pylint: disable=import-outside-toplevel
  bodies = [f"parquet document {i} " + "é" * i for i in range(12)]
  table = pyarrow.table({"id": list(range(12)), "body": bodies, "text": ["decoy"] * 12})
  pyarrow_parquet.write_table(table, tmp_path / "part.parquet", row_group_size=5)
  (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
  before = data.bad_data_counts()["bad_files"]
  assert _documents_read(_config(tmp_path, jsonl_field="body")) == set(bodies)
  assert data.bad_data_counts()["bad_files"] - before == 1
