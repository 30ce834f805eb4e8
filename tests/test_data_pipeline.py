"""make_iterator: determinism, process sharding, held-out split, packing, resume in a new process.

Oracles: the held-out membership and the packed rows are recomputed here from their definitions
(SHA-1 of the relative path; [BOS] bytes [EOS] concatenated and cut every seq_len tokens), and
resume is checked against a second Python process.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from s5scale import data
from s5scale import defaults

BOS, EOS, PAD = 257, 258, 256
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _text_dir(root, count=40):
  """Documents of different lengths with unique, recognisable contents."""
  documents = {}
  for i in range(count):
    relpath = f"part{i % 3}/doc{i:03d}.txt"
    documents[relpath] = f"<doc {i:03d}>" + "abcdefghij"[: i % 10] * (1 + i % 4) + "</doc>"
    (root / relpath).parent.mkdir(parents=True, exist_ok=True)
    (root / relpath).write_text(documents[relpath])
  return documents


def _config(source, **overrides):
  config = defaults.base_config().data
  config.update(dict(kind="text", source=str(source), batch_size=4, seq_len=32, seed=3,
                     heldout_fraction=0.25, num_workers=0, read_threads=2))
  config.update(overrides)
  return config


def _is_heldout(relpath, fraction):
  return int.from_bytes(hashlib.sha1(relpath.encode()).digest()[:8], "big") / 2**64 < fraction


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _all(iterator):
  return list(iterator)


def _stream_of(batches):
  """Undo the one-token row overlap: the token stream a process saw, padding dropped."""
  stream = []
  for batch in batches:
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      row = [token for token in list(inputs) + [targets[-1]] if token != PAD]
      if row:
        stream += row if not stream else row[1:]
  return stream


def _documents_in(stream):
  text = bytes(t if t < 256 else 0 for t in stream).decode()
  return {piece for piece in text.split("\0") if piece}


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for one, other in zip(first, second):
    assert one.keys() == other.keys()
    for key in one:
      np.testing.assert_array_equal(one[key], other[key], err_msg=key)


def test_same_seed_same_batches_and_another_seed_differs(tmp_path):
  _text_dir(tmp_path)
  first = _take(data.make_iterator(_config(tmp_path), "train"), 12)
  second = _take(data.make_iterator(_config(tmp_path), "train"), 12)
  _assert_same_batches(first, second)
  other = _take(data.make_iterator(_config(tmp_path, seed=4), "train"), 12)
  assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))


def test_two_processes_get_disjoint_shards_whose_union_is_the_split(tmp_path):
  documents = _text_dir(tmp_path)
  config = _config(tmp_path)
  train_docs = {text for path, text in documents.items() if not _is_heldout(path, 0.25)}
  single = _all(data.make_iterator(config, "train", num_epochs=1))
  assert _documents_in(_stream_of(single)) == train_docs
  # Packed rows are what processes split: disjoint, and together the single-process rows.
  rows = lambda batches: [tuple(r) for b in batches for r, m in zip(b["inputs"], b["mask"])
                          if m.any()]
  per_process = []
  for process_index in range(2):
    iterator = data.make_iterator(config, "train", process_index=process_index,
                                  process_count=2, num_epochs=1)
    batches = _all(iterator)
    assert all(batch["inputs"].shape == (2, 32) for batch in batches)   # local batch 4 // 2
    per_process.append(rows(batches))
  assert not set(per_process[0]) & set(per_process[1])
  assert sorted(per_process[0] + per_process[1]) == sorted(rows(single))


def test_heldout_split_is_the_hash_oracle_disjoint_and_independent_of_process_count(tmp_path):
  documents = _text_dir(tmp_path)
  config = _config(tmp_path)
  expected = {text for path, text in documents.items() if _is_heldout(path, 0.25)}
  assert 0 < len(expected) < len(documents)
  single = _all(data.make_iterator(config, "heldout", num_epochs=1))
  assert _documents_in(_stream_of(single)) == expected
  train = _documents_in(_stream_of(_all(data.make_iterator(config, "train", num_epochs=1))))
  assert not train & expected and train | expected == set(documents.values())
  # Two processes: disjoint rows, union = the single-process rows, same number of batches.
  per_process = [_all(data.make_iterator(config, "heldout", process_index=i, process_count=2,
                                         num_epochs=1)) for i in range(2)]
  assert len(per_process[0]) == len(per_process[1])
  rows = lambda batches: [tuple(r) for b in batches for r, m in zip(b["inputs"], b["mask"])
                          if m.any()]
  assert sorted(rows(per_process[0]) + rows(per_process[1])) == sorted(rows(single))
  assert not set(rows(per_process[0])) & set(rows(per_process[1]))
  # A second run sees exactly the same held-out batches.
  _assert_same_batches(single, _all(data.make_iterator(config, "heldout", num_epochs=1)))


def test_packing_matches_an_independent_packing_of_known_documents(tmp_path):
  documents = _text_dir(tmp_path, count=12)
  seq_len = 16
  config = _config(tmp_path, heldout_fraction=0.999999, seq_len=seq_len, batch_size=2)
  # Oracle: held-out documents in id order, each [BOS] bytes [EOS], rows of seq_len + 1 taken
  # every seq_len tokens; a target counts unless it is padding or a document's first token.
  stream, starts = [], []
  for relpath in sorted(documents):
    starts.append(len(stream))
    stream += [BOS] + list(documents[relpath].encode()) + [EOS]
  is_start = np.zeros(len(stream), bool)
  is_start[starts] = True
  batches = _all(data.make_iterator(config, "heldout", num_epochs=1))
  rows = [(b["inputs"][r], b["targets"][r], b["mask"][r], b["reset"][r], b["target_bytes"][r])
          for b in batches for r in range(2)]
  num_rows = -(-(len(stream) - 1) // seq_len)
  assert len(rows) == num_rows + num_rows % 2                      # padded to whole batches
  for k, (inputs, targets, mask, reset, target_bytes) in enumerate(rows[:num_rows]):
    window = stream[k * seq_len:k * seq_len + seq_len + 1]
    valid = len(window) - 1
    np.testing.assert_array_equal(inputs[:valid], window[:-1])
    np.testing.assert_array_equal(targets[:valid], window[1:])
    np.testing.assert_array_equal(reset[:valid], is_start[k * seq_len:k * seq_len + valid])
    expected_mask = ~is_start[k * seq_len + 1:k * seq_len + 1 + valid]
    np.testing.assert_array_equal(mask[:valid], expected_mask)
    np.testing.assert_array_equal(target_bytes[:valid],
                                  expected_mask & (np.asarray(window[1:]) < 256))
    assert not mask[valid:].any() and not reset[valid:].any()
  for _, _, mask, _, _ in rows[num_rows:]:
    assert not mask.any()


def test_text_defaults_to_the_standard_library():
  config = _config("", seq_len=64)
  assert data.vocab_size(config) == 260
  batch = next(data.make_iterator(config, "train"))
  assert batch["inputs"].shape == (4, 64) and batch["inputs"].dtype == np.int32
  assert batch["targets"].dtype == np.int32 and batch["mask"].dtype == np.float32
  assert batch["reset"].dtype == bool and batch["target_bytes"].dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert data.decode_tokens(config, data.encode_prompt(config, "def f(x):")) == "def f(x):"


def test_batch_size_must_divide_by_process_count(tmp_path):
  _text_dir(tmp_path)
  with pytest.raises(ValueError, match="data.batch_size"):
    data.make_iterator(_config(tmp_path, batch_size=5), "train", process_count=2)


def test_audio_lm_and_classification_batches_from_the_procedural_corpus():
  config = _config("", kind="audio", seq_len=128, batch_size=4)
  batch = next(data.make_iterator(config, "train"))
  assert batch["inputs"].shape == (4, 128) and batch["inputs"].max() < 256
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert batch["mask"].all() and batch["reset"][:, 0].all() and not batch["reset"][:, 1:].any()
  config.task = "classify"
  assert data.num_classes(config) == 6
  batches = _take(data.make_iterator(config, "train"), 6)
  assert batches[0]["inputs"].shape == (4, 128, 1) and batches[0]["inputs"].dtype == np.float32
  labels = np.concatenate([b["label"] for b in batches])
  assert labels.dtype == np.int32 and set(labels) <= set(range(6)) and len(set(labels)) > 1


_RESUME_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {repo!r})
from s5scale import data, defaults
config = defaults.base_config().data
config.update(json.loads({config!r}))
iterator = data.make_iterator(config, "train", process_index={index}, process_count=2)
with open({state_path!r}) as f:
  iterator.set_state(json.load(f))
batches = [next(iterator) for _ in range({count})]
np.savez({out!r}, **{{f"{{i}}_{{k}}": v for i, b in enumerate(batches) for k, v in b.items()}})
"""


@pytest.mark.parametrize("kind", ["text", "audio"])
def test_resume_from_a_saved_state_in_a_new_process(tmp_path, kind):
  if kind == "text":
    _text_dir(tmp_path / "src")
    config = _config(tmp_path / "src", seq_len=24)
  else:
    config = _config("", kind="audio", seq_len=64)
  uninterrupted = _take(data.make_iterator(config, "train", process_index=1, process_count=2),
                        16)
  iterator = data.make_iterator(config, "train", process_index=1, process_count=2)
  _take(iterator, 9)
  (tmp_path / "state.json").write_text(json.dumps(iterator.get_state()))
  script = _RESUME_SCRIPT.format(repo=REPO, config=json.dumps(config.to_dict()), index=1,
                                 state_path=str(tmp_path / "state.json"), count=7,
                                 out=str(tmp_path / "resumed.npz"))
  subprocess.run([sys.executable, "-c", script], check=True, timeout=120,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  with np.load(tmp_path / "resumed.npz") as saved:
    resumed = [{k: saved[f"{i}_{k}"] for k in uninterrupted[0]} for i in range(7)]
  _assert_same_batches(uninterrupted[9:], resumed)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_a_resumable_state(tmp_path):
  _text_dir(tmp_path)
  in_process = _take(data.make_iterator(_config(tmp_path), "train"), 10)
  iterator = data.make_iterator(_config(tmp_path, num_workers=2), "train")
  _assert_same_batches(in_process[:4], _take(iterator, 4))
  state = json.loads(json.dumps(iterator.get_state()))
  restored = data.make_iterator(_config(tmp_path, num_workers=2), "train")
  restored.set_state(state)
  _assert_same_batches(in_process[4:10], _take(restored, 6))
  iterator.close()
  restored.close()


def test_sentencepiece_tokenizer_by_path(tmp_path):
  import sentencepiece  # pylint: disable=import-outside-toplevel
  documents = _text_dir(tmp_path / "src", count=30)
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(documents.values()) * 5)
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300,
      byte_fallback=True, minloglevel=2)
  config = _config(tmp_path / "src", tokenizer=str(tmp_path / "sp.model"),
                   heldout_fraction=0.999999, seq_len=48, batch_size=2)
  processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
  assert processor.pad_id() == -1           # the model has no PAD piece: one is appended
  pad = processor.get_piece_size()
  assert data.vocab_size(config) == pad + 1
  batches = _all(data.make_iterator(config, "heldout", num_epochs=1))
  # Every held-out document (all of them here) is in the stream, as SentencePiece encodes it.
  stream = []
  for batch in batches:
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      row = list(inputs) + [targets[-1]]
      stream += row if not stream else row[1:]
  bos, eos = processor.bos_id(), processor.eos_id()
  expected = []
  for relpath in sorted(documents):
    expected += [bos] + processor.encode(documents[relpath]) + [eos]
  assert stream[:len(expected)] == expected
  assert set(stream[len(expected):]) <= {pad}
  # Bits per byte needs the UTF-8 bytes behind every counted target: they add up to the text.
  total_bytes = sum(int(b["target_bytes"].sum()) for b in batches)
  assert total_bytes == sum(len(text.encode()) for text in documents.values())
