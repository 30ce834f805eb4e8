"""data.mixture: weighted proportions, bit-exact resume in a new process, per-process shards,
per-source counts and held-out splits.

Oracles: each document names its source in its text (read back from the decoded token stream),
the binomial bound of the weights, a second Python process, and held-out membership recomputed
from the SHA-1 rule.
"""

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from s5scale import data
from s5scale import defaults
from tests import helpers

PAD = 256


def _corpus(root, tag, count=50):
  """`count` short documents, each starting with its source's tag."""
  documents = {}
  for i in range(count):
    relpath = f"doc{i:03d}.txt"
    documents[relpath] = f"{tag}{i:03d}" + "xyz"[: i % 3] * (i % 5)
    (root / relpath).parent.mkdir(parents=True, exist_ok=True)
    (root / relpath).write_text(documents[relpath])
  return documents


def _text_config(tmp_path, **overrides):
  _corpus(tmp_path / "alpha", "A")
  _corpus(tmp_path / "beta", "B")
  config = defaults.base_config().data
  config.update(dict(kind="text", source="", batch_size=4, seq_len=64, seed=5,
                     heldout_fraction=0.2, num_workers=0, read_threads=2,
                     mixture=f"{tmp_path}/alpha:0.7,{tmp_path}/beta:0.3"))
  config.update(overrides)
  return config


def _documents(batches) -> list[str]:
  """The documents of a packed batch stream in order (rows overlap by one token)."""
  stream = []
  for batch in batches:
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      row = [int(t) for t in list(inputs) + [targets[-1]]]
      stream += row if not stream else row[1:]
  text = bytes(t if t < 256 else 0 for t in stream if t != PAD).decode()
  return [piece for piece in text.split("\0") if piece]


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_proportions_are_within_binomial_noise_of_the_weights(tmp_path):
  config = _text_config(tmp_path)
  before = data.source_counts()
  iterator = data.make_iterator(config, "train")
  batches = []
  while len(_documents(batches)) < 2001:
    batches += _take(iterator, 4)
  documents = _documents(batches)[:2000]
  from_alpha = sum(document.startswith("A") for document in documents)
  assert sum(document.startswith(("A", "B")) for document in documents) == 2000
  bound = 4 * math.sqrt(2000 * 0.7 * 0.3)           # 4 standard deviations
  assert abs(from_alpha - 0.7 * 2000) < bound, from_alpha
  counts = data.source_counts()
  read = {name: counts[name] - before.get(name, 0) for name in counts}
  assert read["examples/alpha"] >= from_alpha and read["examples/beta"] >= 2000 - from_alpha
  # Only train documents: the held-out ones (SHA-1 rule) never appear.
  heldout = {f"{tag}{relpath[3:6]}" for tag, source in (("A", "alpha"), ("B", "beta"))
             for relpath in os.listdir(tmp_path / source)
             if int.from_bytes(hashlib.sha1(relpath.encode()).digest()[:8], "big") / 2**64 < 0.2}
  assert heldout and not {document[:4] for document in documents} & heldout


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


def test_an_interrupted_mixture_resumes_bit_for_bit_in_a_new_process(tmp_path):
  config = _text_config(tmp_path)
  uninterrupted = _take(data.make_iterator(config, "train", process_index=1, process_count=2), 14)
  iterator = data.make_iterator(config, "train", process_index=1, process_count=2)
  _take(iterator, 6)
  (tmp_path / "state.json").write_text(json.dumps(iterator.get_state()))
  script = _RESUME_SCRIPT.format(repo=helpers.REPO, config=json.dumps(config.to_dict()), index=1,
                                 state_path=str(tmp_path / "state.json"), count=8,
                                 out=str(tmp_path / "resumed.npz"))
  subprocess.run([sys.executable, "-c", script], check=True, timeout=120,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  with np.load(tmp_path / "resumed.npz") as saved:
    for i, batch in enumerate(uninterrupted[6:]):
      for key, value in batch.items():
        np.testing.assert_array_equal(saved[f"{i}_{key}"], value, err_msg=f"batch {i} {key}")


def _audio_config(tmp_path):
  """Two folders of short distinct tones: unpacked crops, strided over processes."""
  for folder, base in (("low", 200), ("high", 2000)):
    (tmp_path / folder).mkdir()
    for i in range(6):
      t = np.arange(800) / 16000
      soundfile.write(tmp_path / folder / f"clip{i}.wav",
                      0.5 * np.sin(2 * np.pi * (base + 37 * i) * t), 16000, subtype="PCM_16")
  config = defaults.base_config().data
  config.update(dict(kind="audio", source="", batch_size=4, seq_len=64, seed=1,
                     heldout_fraction=0.0, num_workers=0, read_threads=2,
                     mixture=f"{tmp_path}/low:0.5,{tmp_path}/high:0.5"))
  return config


@pytest.mark.parametrize("kind", ["text", "audio"])
def test_two_processes_read_disjoint_shards_whose_union_is_one_process(tmp_path, kind):
  config = _text_config(tmp_path) if kind == "text" else _audio_config(tmp_path)

  def rows(iterator, count):
    return [tuple(np.asarray(row).tolist()) for batch in _take(iterator, count)
            for row in batch["inputs"].reshape(batch["inputs"].shape[0], -1)]

  whole = rows(data.make_iterator(config, "train"), 10)
  first = rows(data.make_iterator(config, "train", process_index=0, process_count=2), 10)
  second = rows(data.make_iterator(config, "train", process_index=1, process_count=2), 10)
  # Global batch k holds the same examples however many processes read it.
  for step in range(10):
    assert (sorted(first[2 * step:2 * step + 2] + second[2 * step:2 * step + 2])
            == sorted(whole[4 * step:4 * step + 4]))
  if kind == "text":   # packed rows are unique positions of one stream: strictly disjoint
    assert not set(first) & set(second)


def test_a_mixture_with_source_and_a_bad_entry_are_errors(tmp_path):
  config = _text_config(tmp_path)
  config.source = str(tmp_path / "alpha")
  with pytest.raises(ValueError, match="data.mixture"):
    data.make_iterator(config, "train")
  with pytest.raises(ValueError, match="data.mixture"):
    data.make_iterator(_text_config(tmp_path, mixture=f"{tmp_path}/alpha:0.7,x:zero"), "train")


@pytest.mark.slow
def test_training_counts_each_source_and_eval_reports_each_heldout_split(tmp_path):
  config = _text_config(tmp_path)
  workdir = tmp_path / "run"
  result = helpers.run("train", "text_small.py", workdir, helpers.overrides(
      data__mixture=config.mixture, data__heldout_fraction=0.2, train__num_steps=2,
      eval__every_steps=2, eval__max_batches=0, eval__compressor_baselines=False,
      checkpoint__every_steps=100), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  last = helpers.read_jsonl(workdir / "metrics.jsonl")[-1]
  assert last["data/examples/alpha"] > last["data/examples/beta"] > 0
  records = {r["split"]: r for r in helpers.read_jsonl(workdir / "eval" / "metrics.jsonl")}
  assert set(records) == {"heldout", "heldout/alpha", "heldout/beta"}

  def heldout_bytes(source):
    return sum(len((tmp_path / source / relpath).read_bytes())
               for relpath in os.listdir(tmp_path / source)
               if int.from_bytes(hashlib.sha1(relpath.encode()).digest()[:8], "big") / 2**64
               < 0.2)
  assert records["heldout/alpha"]["heldout/alpha/num_bytes"] == heldout_bytes("alpha")
  assert records["heldout/beta"]["heldout/beta/num_bytes"] == heldout_bytes("beta")
  assert records["heldout"]["heldout/num_bytes"] == heldout_bytes("alpha") + heldout_bytes("beta")
