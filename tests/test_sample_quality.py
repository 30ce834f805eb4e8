"""SaShiMi's sample-quality protocol, recomputed BatchNorm statistics, low-passed eval.

Oracles: float64 NumPy loops written from the metric definitions, the closed-form Fréchet distance
of Gaussians (by eigendecomposition), a spectrum taken with NumPy's FFT, BatchNorm inputs recorded
by a flax method interceptor during the training-mode forward pass, and records on disk written by
the entry points run as subprocesses.
"""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from s5scale import sample_metrics, steps
from s5scale.data import audio
from s5scale.nn.model import S5Model
from tests import helpers
from tests.helpers import SAMPLE_RATE, WORDS, heldout_speakers, speech_commands_tree
from tests.helpers import tiny_config


def _probability_table(rows, classes, seed):
  logits = np.random.default_rng(seed).normal(0, 2, (rows, classes))
  probs = np.exp(logits)
  return probs / probs.sum(axis=1, keepdims=True)


def _kl(p, q):
  return sum(p[y] * np.log(p[y] / q[y]) for y in range(len(p)) if p[y] > 0)


def test_is_mis_am_match_loops_over_the_definitions():
  probs, reference = _probability_table(7, 4, 0), _probability_table(11, 4, 1)
  n, k = probs.shape
  marginal = [sum(probs[i, y] for i in range(n)) / n for y in range(k)]
  expected_is = np.exp(sum(_kl(probs[i], marginal) for i in range(n)) / n)
  expected_mis = np.exp(sum(_kl(probs[i], probs[j]) for i in range(n) for j in range(n)) / n**2)
  reference_marginal = [sum(reference[i, y] for i in range(len(reference))) / len(reference)
                        for y in range(k)]
  entropy = sum(-sum(probs[i, y] * np.log(probs[i, y]) for y in range(k)) for i in range(n)) / n
  expected_am = _kl(reference_marginal, marginal) + entropy
  np.testing.assert_allclose(sample_metrics.inception_score(probs), expected_is, rtol=1e-10)
  np.testing.assert_allclose(sample_metrics.modified_inception_score(probs), expected_mis,
                             rtol=1e-10)
  np.testing.assert_allclose(sample_metrics.am_score(probs, reference), expected_am, rtol=1e-10)


def test_perfect_confident_classifier_scores_is_equal_to_the_number_of_classes():
  classes = 10
  one_hot = np.eye(classes)[np.repeat(np.arange(classes), 5)]    # 5 clips of each class
  assert sample_metrics.inception_score(one_hot) == pytest.approx(classes, rel=1e-9)
  assert sample_metrics.am_score(one_hot, one_hot) == pytest.approx(0.0, abs=1e-9)
  # All clips called the same class: IS 1, and AM pays KL(uniform || one class) = log(K / 1)...
  assert sample_metrics.inception_score(np.eye(classes)[np.zeros(20, int)]) == pytest.approx(1.0)
  # ...while a classifier unsure of everything (uniform) has IS and mIS 1 and AM log K.
  uniform = np.full((6, classes), 1 / classes)
  assert sample_metrics.inception_score(uniform) == pytest.approx(1.0)
  assert sample_metrics.modified_inception_score(uniform) == pytest.approx(1.0)
  assert sample_metrics.am_score(uniform, one_hot) == pytest.approx(np.log(classes))


def _closed_form_frechet(mean_a, cov_a, mean_b, cov_b):
  """|Δμ|² + tr A + tr B − 2 tr (A^½ B A^½)^½, the roots by symmetric eigendecomposition."""
  values, vectors = np.linalg.eigh(cov_a)
  root_a = vectors @ np.diag(np.sqrt(values)) @ vectors.T
  inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
  return (np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
          - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_frechet_distance_of_gaussians_matches_the_closed_form():
  rng = np.random.default_rng(0)
  dim = 4
  factors = rng.normal(size=(2, dim, dim))
  cov_a, cov_b = factors[0] @ factors[0].T + 0.1 * np.eye(dim), factors[1] @ factors[1].T
  mean_a, mean_b = rng.normal(size=dim), rng.normal(size=dim)
  expected = _closed_form_frechet(mean_a, cov_a, mean_b, cov_b)
  assert sample_metrics.frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(
      expected, rel=1e-8)
  assert sample_metrics.frechet_distance(mean_a, cov_a, mean_a, cov_a) == pytest.approx(
      0.0, abs=1e-8)
  # From features: sample estimates converge on the closed form of the generating Gaussians.
  features_a = rng.multivariate_normal(mean_a, cov_a, size=200_000)
  features_b = rng.multivariate_normal(mean_b, cov_b, size=200_000)
  assert sample_metrics.fid(features_a, features_b) == pytest.approx(expected, rel=0.02)
  # Diagonal covariances: sum (sqrt a - sqrt b)^2 plus the squared mean gap.
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
  assert sample_metrics.frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == (
      pytest.approx(3 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)))


def test_silent_fraction_counts_clips_with_nothing_above_minus_40_dbfs_inside_their_mask():
  length = 100
  clips = np.zeros((5, length))
  clips[1, 50] = 0.02                   # one audible click: not silent
  clips[2, :] = 0.005                   # -46 dBFS hum: silent
  clips[3, 90:] = 0.8                   # loud, but only in the padding its mask leaves out
  clips[4] = 0.5 * np.sin(np.arange(length))
  masks = np.ones((5, length))
  masks[3, 80:] = 0
  # Silent by hand: clips 0, 2 and 3 of 5.
  assert sample_metrics.silent_fraction(clips, masks) == pytest.approx(3 / 5)
  assert sample_metrics.silent_fraction(-clips, masks) == pytest.approx(3 / 5)   # |x|, not x


def test_band_limit_removes_what_the_lower_rate_cannot_carry():
  rate, time = 16000, np.arange(16000) / 16000
  tones = np.sin(2 * np.pi * 1000 * time) + np.sin(2 * np.pi * 6000 * time)
  limited = audio.band_limit(np.stack([tones, tones])[..., None], rate, 4000, axis=1)
  assert limited.shape == (2, 16000, 1)
  spectrum = np.abs(np.fft.rfft(limited[0, :, 0])) / (len(time) / 2)   # 1 Hz bins: amplitude
  assert spectrum[1000] == pytest.approx(1.0, abs=0.01)
  assert spectrum[6000] < 1e-3


def test_recomputed_batch_stats_average_each_batch_norm_input_over_batches():
  config = tiny_config(model__norm="batch", model__task="classify", model__num_classes=3,
                       model__input_kind="continuous", model__scan_layers=False,
                       model__dropout=0.3)
  model = S5Model.from_config(config.model)
  rng = np.random.default_rng(0)
  batches = [{"inputs": rng.normal(i, 1 + i, (4, 20, 1)).astype(np.float32),
              "mask": np.ones((4, 20), np.float32)} for i in range(3)]
  variables = model.init(jax.random.PRNGKey(0), batches[0]["inputs"])
  params, saved_stats = variables["params"], variables["batch_stats"]

  recorded = {}   # module path -> per-batch (mean, var) of its input, float64

  def record_inputs(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
      x = np.asarray(args[0], np.float64).reshape(-1, np.shape(args[0])[-1])
      recorded.setdefault(context.module.path, []).append((x.mean(0), x.var(0)))
    return next_fun(*args, **kwargs)

  without_dropout = model.clone(dropout=0.0)   # the statistics are used with dropout off
  for batch in batches:
    with nn.intercept_methods(record_inputs):
      without_dropout.apply(variables, batch["inputs"], train=True, mutable=["batch_stats"])

  got = steps.recompute_batch_stats(steps.make_batch_statistics_step(model), params, saved_stats,
                                    batches)
  got = nn.unbox(got)
  assert len(recorded) == 3     # one BatchNorm per block (no MLP) and the final norm
  for path, per_batch in recorded.items():
    node = got
    for name in path:
      node = node[name]
    assert len(per_batch) == len(batches)
    np.testing.assert_allclose(node["mean"], np.mean([m for m, _ in per_batch], 0), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(node["var"], np.mean([v for _, v in per_batch], 0), rtol=1e-4,
                               atol=1e-5)


FRACTION = 0.3


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
  """A two-word synthetic Speech Commands tree and a classifier trained on it."""
  root = tmp_path_factory.mktemp("runs")
  source = root / "sc"
  speech_commands_tree(source)
  shared = helpers.overrides(data__source=source, data__heldout_fraction=FRACTION,
                          data__sample_rate=SAMPLE_RATE, data__batch_size=4, eval__every_steps=0)
  classifier = root / "classifier"
  classifier_flags = shared + ["--config.data.seq_len=400", "--config.train.num_steps=30",
                                "--config.model.dropout=0"]
  result = helpers.run("train", "speech_commands.py", classifier, classifier_flags + [
      "--config.checkpoint.every_steps=30", "--config.optim.learning_rate=1e-2"])
  assert result.returncode == 0, result.stderr[-3000:]
  return dict(root=root, source=source, classifier=classifier, shared=shared,
              classifier_flags=classifier_flags)


@pytest.fixture(scope="module")
def tiny_runs(classifier_run):
  """The classifier's tree and classifier, and an audio LM trained on that tree."""
  lm = classifier_run["root"] / "lm"
  lm_flags = classifier_run["shared"] + [
      "--config.data.seq_len=64", "--config.train.num_steps=4", "--config.model.d_model=64",
      "--config.model.ssm_size=64", "--config.checkpoint.every_steps=2",
      "--config.generate.length=400"]
  result = helpers.run("train", "spoken_digits_lm.py", lm, lm_flags)
  assert result.returncode == 0, result.stderr[-3000:]
  return dict(classifier_run, lm=lm, lm_flags=lm_flags)


@pytest.mark.slow
def test_sample_quality_scores_lm_samples_against_ceiling_and_floor(tiny_runs):
  classifier, lm = tiny_runs["classifier"], tiny_runs["lm"]
  classifier_flags, lm_flags = tiny_runs["classifier_flags"], tiny_runs["lm_flags"]
  heldout_clips = len(heldout_speakers(FRACTION)) * len(WORDS)

  num_samples = 6
  result = helpers.run("sample_quality", "spoken_digits_lm.py", lm, lm_flags + [
      f"--classifier_workdir={classifier}", f"--num_samples={num_samples}"])
  assert result.returncode == 0, result.stderr[-3000:]
  printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  records = [r for r in helpers.read_jsonl(lm / "eval" / "metrics.jsonl") if r["split"] == "samples"]
  assert [r["step"] for r in records] == [2, 4] == [p["step"] for p in printed]
  ceiling_clips = heldout_clips // 2                # the odd half of the held-out clips
  for record, line in zip(records, printed):
    assert record["classifier"] == str(classifier) and record["classifier_step"] == 30
    assert record["samples/num_samples"] == line["num_samples"] == num_samples
    assert sum(record["samples/class_counts"]) == num_samples
    for name in ("ceiling", "noise"):
      assert record[f"samples/{name}/num_samples"] == min(num_samples, ceiling_clips)
    for key in ("is", "mis", "am", "fid"):
      assert record[f"samples/{key}"] == line[key] and np.isfinite(line[key])
      assert 1.0 <= line["is"] <= len(WORDS) and line["mis"] >= 1.0
    assert record["samples/ceiling/fid"] < record["samples/noise/fid"]
    # Real tones and peak-normalised noise are loud throughout.
    assert record["samples/ceiling/silent_fraction"] == record["samples/noise/silent_fraction"] == 0
    assert record["samples/ceiling/accuracy"] == 1.0   # two tones: trivially separable
    assert record["samples/ceiling/label_counts"] == [ceiling_clips // 2] * 2
  assert len(list((lm / "samples" / "quality" / "step_4").glob("*.wav"))) == num_samples
  assert all((r["temperature"], r["top_p"], r["seed"]) == (1.0, 1.0, 0) for r in records)
  # Another temperature or seed is another result: both checkpoints are scored again, at it.
  result = helpers.run("sample_quality", "spoken_digits_lm.py", lm, lm_flags + [
      f"--classifier_workdir={classifier}", "--num_samples=2", "--config.generate.temperature=0.5",
      "--config.generate.seed=3"])
  assert result.returncode == 0, result.stderr[-3000:]
  records = [r for r in helpers.read_jsonl(lm / "eval" / "metrics.jsonl") if r["split"] == "samples"]
  assert [(r["step"], r["temperature"], r["seed"]) for r in records] == [
      (2, 1.0, 0), (4, 1.0, 0), (2, 0.5, 3), (4, 0.5, 3)]
  quality = lm / "samples" / "quality"
  assert len(list((quality / "step_4_t0.5_p1_s3").glob("*.wav"))) == 2     # its own folder:
  assert len(list((quality / "step_4").glob("*.wav"))) == num_samples    # nothing overwritten
  # Two ceiling clips still hold both words, though held-out clips come one word after the
  # other (the first two odd clips are the same word).
  assert records[-1]["samples/ceiling/label_counts"] == [1, 1]

  # The classifier's eval diagnostics: recomputed BatchNorm statistics, low-passed clips.
  result = helpers.run("evaluate", "speech_commands.py", classifier, classifier_flags + [
      "--config.eval.recompute_batch_stats=2", "--config.eval.lowpass_hz=1500",
      "--config.eval.max_batches=0"])
  assert result.returncode == 0, result.stderr[-3000:]
  record = helpers.read_jsonl(classifier / "eval" / "metrics.jsonl")[-1]
  split = "heldout_recomputed_bn2_lowpass1500"
  assert record["split"] == split and record[f"{split}/num_predictions"] == heldout_clips
  # Both tones (200 Hz, 1.1 kHz) lie below the cutoff, so band-limiting leaves the task as easy.
  assert record[f"{split}/accuracy"] == 1.0


def _score_dir(*flags, env=None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "s5scale.sample_quality", *flags],
                        env=env or helpers.env_for(1), capture_output=True, text=True,
                        timeout=600, cwd=helpers.REPO)


def _listing(root) -> dict:
  """Every path under root, root included -> (mtime in ns, size)."""
  paths = [os.path.join(folder, name) for folder, _, files in os.walk(root)
           for name in ["", *files]]
  return {os.path.relpath(p, root): (os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in paths}


def _chmod_folders(root, mode: int) -> None:
  for folder, _, _ in os.walk(root):
    os.chmod(folder, mode)


@pytest.mark.slow
def test_samples_dir_is_only_read_and_its_class_folders_give_accuracy(classifier_run, tmp_path):
  source, classifier = classifier_run["source"], classifier_run["classifier"]
  low, high = sorted((source / "low").glob("*.wav")), sorted((source / "high").glob("*.wav"))
  clips = tmp_path / "clips"
  for folder in ("low", "high", "_background_noise_"):
    (clips / folder).mkdir(parents=True)
  for path in low[:3]:
    shutil.copy(path, clips / "low")
  shutil.copy(high[0], clips / "low" / "mislabelled.wav")   # a "high" tone filed under low
  for path in high[1:5]:
    shutil.copy(path, clips / "high")
  shutil.copy(high[5], clips / "loose.wav")                 # top level: scored, no label
  shutil.copy(low[3], clips / "_background_noise_")         # not a class folder: not read
  scoring = [f"--samples_dir={clips}", f"--classifier_workdir={classifier}",
             f"--reference={source}"]

  for bad, named in [([], "--workdir"), ([f"--workdir={clips / 'records'}"], "inside"),
                     ([f"--samples_dir={tmp_path / 'absent'}", f"--workdir={tmp_path / 'w'}"],
                      str(tmp_path / "absent"))]:
    result = _score_dir(*scoring, *bad)
    assert result.returncode == 2 and named in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
  assert not (tmp_path / "absent").exists()

  # Read-only folders; as root chmod does not stop writes, so the listing below is the check
  # that holds either way.
  before = _listing(clips)
  _chmod_folders(clips, 0o555)
  try:
    # Run as a user would, with no JAX_PLATFORMS: libtpu (if installed) must not start and
    # complain.
    env = helpers.env_for(1)
    del env["JAX_PLATFORMS"]
    result = _score_dir(*scoring, f"--workdir={tmp_path / 'records'}", env=env)
  finally:
    _chmod_folders(clips, 0o755)
  assert result.returncode == 0, result.stderr[-3000:]
  assert [line for line in result.stderr.splitlines() if "E0000" in line] == []
  assert _listing(clips) == before
  record = helpers.read_jsonl(tmp_path / "records" / "eval" / "metrics.jsonl")[-1]
  assert record["split"] == "samples" and record["samples/num_samples"] == 9
  words = sorted(WORDS)
  # The classifier tells the two tones apart (its ceiling accuracy is 1.0): 3 low, 6 high...
  assert record["samples/class_counts"][words.index("low")] == 3
  assert record["samples/class_counts"][words.index("high")] == 6
  # ...so of the 8 clips in class folders, all but the mislabelled one match their folder.
  assert record["samples/accuracy"] == pytest.approx(7 / 8)
  last = json.loads(result.stdout.strip().splitlines()[-1])
  assert last["accuracy"] == pytest.approx(7 / 8) and last["silent_fraction"] == 0.0


@pytest.mark.slow
def test_context_curve_scores_each_length_as_the_eval_job_does(tiny_runs, tmp_path):
  lm, lm_flags = tiny_runs["lm"], tiny_runs["lm_flags"]
  output = tmp_path / "curve.png"
  # The whole held-out split, so the curve may use larger batches for short windows.
  whole_split = ["--config.eval.max_batches=0"]
  result = subprocess.run(
      [sys.executable, f"{helpers.REPO}/tools/context_curve.py",
       f"--config={helpers.REPO}/configs/spoken_digits_lm.py", f"--workdir={lm}", "--step=4",
       "--seq_lens=16,128", "--carried", f"--output={output}", *lm_flags, *whole_split],
      env=helpers.env_for(1), capture_output=True, text=True, timeout=600, cwd=helpers.REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [r for r in helpers.read_jsonl(f"{output}.jsonl") if "seq_len" in r]
  carried = [r for r in helpers.read_jsonl(f"{output}.jsonl") if "context" in r]
  assert [r["seq_len"] for r in rows] == [16, 128] and all(r["step"] == 4 for r in rows)
  # Bins of position in the clip, [0, 256), [256, 512), ...: every sample in exactly one.
  assert [r["context"] for r in carried] == [256 * 2**k for k in range(len(carried))]
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  assert matplotlib.image.imread(output).shape[:2] == (400, 600)
  # The eval job at eval.seq_len=16, a separate process, gives the first point.
  # With eval.carry_state it also streams each clip whole, in 16-sample windows with the state
  # carried: the curve's bins, weighted by their samples, give that score back.
  result = helpers.run("evaluate", "spoken_digits_lm.py", lm,
                    lm_flags + whole_split + ["--step=4", "--config.eval.seq_len=16",
                                              "--config.eval.carry_state=True"])
  assert result.returncode == 0, result.stderr[-3000:]
  heldout = [r for r in helpers.read_jsonl(lm / "eval" / "metrics.jsonl") if r["split"] == "heldout"]
  assert heldout[-1]["heldout/bits_per_sample"] == pytest.approx(rows[0]["bits_per_sample"],
                                                                rel=1e-6)
  assert heldout[-1]["heldout/num_predictions"] == rows[0]["num_predictions"]
  scored = sum(r["num_samples"] for r in carried)
  assert heldout[-1]["heldout_carried/num_predictions"] == scored
  binned = sum(r["bits_per_sample"] * r["num_samples"] for r in carried) / scored
  assert heldout[-1]["heldout_carried/bits_per_sample"] == pytest.approx(binned, rel=1e-4)
