"""The Speech Commands classifier path. Oracles: a float64 NumPy batch normalisation,
label folders and a SHA-1 speaker split counted on disk, and the eval records written to disk."""


import flax.linen as nn
import jax
import numpy as np
import pytest
import soundfile

from s5scale import config_schema, data, defaults
from s5scale.data import transforms
from s5scale.nn.blocks import Norm
from tests import helpers
from tests.helpers import SAMPLE_RATE, SPEAKERS, WORDS, heldout_speakers, speech_commands_tree


def test_batch_norm_pools_batch_and_time_and_tracks_running_statistics():
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(4, 50, 6)).astype(np.float32)
  variables = Norm("batch", train=True).init(jax.random.PRNGKey(0), x)
  y, updated = Norm("batch", train=True).apply(variables, x, mutable=["batch_stats"])
  x64 = x.astype(np.float64)
  mean, var = x64.mean(axis=(0, 1)), x64.var(axis=(0, 1))
  np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-5), atol=1e-4)
  stats = nn.unbox(updated["batch_stats"])["BatchNorm_0"]
  np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)        # momentum 0.9
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-5)
  # Evaluation normalises with the running statistics, not the batch's.
  y_eval = Norm("batch", train=False).apply({**variables, "batch_stats": updated["batch_stats"]},
                                            x)
  np.testing.assert_allclose(y_eval, (x64 - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-5),
                             atol=1e-4)


def test_num_classes_comes_from_the_label_folders(tmp_path):
  speech_commands_tree(tmp_path)
  config = defaults.base_config()
  config.model.task = config.data.task = "classify"
  config.data.kind, config.data.source = "audio", str(tmp_path)
  data.fill_num_classes(config)
  assert config.model.num_classes == len(WORDS)      # _background_noise_ is not a class
  config.model.num_classes = 5
  with pytest.raises(config_schema.ConfigError, match="model.num_classes=5"):
    data.fill_num_classes(config)


@pytest.mark.slow
def test_speech_commands_config_trains_and_evaluates_zero_shot_at_half_rate(tmp_path):
  source = tmp_path / "sc"
  speech_commands_tree(source)
  fraction = 0.3
  heldout = heldout_speakers(fraction)
  assert 0 < len(heldout) < len(SPEAKERS)
  workdir = tmp_path / "run"
  common = helpers.overrides(data__source=source, data__heldout_fraction=fraction,
                          data__batch_size=4, eval__max_batches=0, train__num_steps=40,
                          checkpoint__every_steps=40, eval__every_steps=0,
                          optim__learning_rate=1e-2, model__dropout=0.0)
  full_rate = [f"--config.data.sample_rate={SAMPLE_RATE}", "--config.data.seq_len=400"]
  result = helpers.run("train", "speech_commands.py", workdir, common + full_rate)
  assert result.returncode == 0, result.stderr[-3000:]
  for flags in (full_rate, [f"--config.data.sample_rate={SAMPLE_RATE // 2}",
                            "--config.data.seq_len=200", "--config.eval.step_rescale=2"]):
    result = helpers.run("evaluate", "speech_commands.py", workdir, common + flags + ["--all"])
    assert result.returncode == 0, result.stderr[-3000:]

  records = {r["split"]: r for r in helpers.read_jsonl(workdir / "eval" / "metrics.jsonl")}
  assert set(records) == {"heldout", "heldout_step_rescale2"}
  for split, record in records.items():
    assert record["step"] == 40
    assert record[f"{split}/num_predictions"] == len(heldout) * len(WORDS)
  # Two tones an octave and more apart: trivially separable, at either rate.
  assert records["heldout"]["heldout/accuracy"] == 1.0
  assert records["heldout_step_rescale2"]["heldout_step_rescale2/accuracy"] >= 0.75

  wrong = helpers.run("evaluate", "speech_commands.py", workdir,
                   common + full_rate + ["--all", "--config.model.num_classes=3"])
  assert wrong.returncode == 2 and "model.num_classes=3" in wrong.stderr


def test_bandlimit_augmentation_removes_the_top_band_from_that_share_of_training_clips(tmp_path):
  """Oracle: the clip's spectrum by NumPy's FFT; a 1 kHz tone stays, a 6 kHz one goes."""
  rate, time = 16000, np.arange(16000) / 16000
  (tmp_path / "word").mkdir()
  for speaker in range(40):
    two_tones = 0.4 * (np.sin(2 * np.pi * 1000 * time) + np.sin(2 * np.pi * 6000 * time + speaker))
    soundfile.write(tmp_path / "word" / f"s{speaker}_nohash_0.wav", two_tones, rate,
                    subtype="PCM_16")
  config = defaults.base_config()
  config.model.task = config.data.task = "classify"
  config.data.kind, config.data.source, config.data.seq_len = "audio", str(tmp_path), 16000
  config.data.heldout_fraction = 0.0

  def tone_levels(probability, cutoff_hz=4000.0):
    config.data.bandlimit_prob, config.data.bandlimit_hz = probability, cutoff_hz
    loader = transforms.make_spec(config.data).loader(train=True)
    levels = []
    for index in range(40):
      spectrum = np.abs(np.fft.rfft(loader(index, np.random.default_rng(index))["waveform"]))
      levels.append((spectrum[1000], spectrum[6000]))    # 1 Hz bins
    return np.asarray(levels)

  kept = tone_levels(0.0)
  assert np.all(kept[:, 1] > 0.5 * kept[:, 0])                 # both tones, untouched
  limited = tone_levels(1.0)
  np.testing.assert_allclose(limited[:, 0], kept[:, 0], rtol=0.05)
  assert np.all(limited[:, 1] < 1e-3 * limited[:, 0])
  half = tone_levels(0.5)[:, 1] < 1e-3 * kept[:, 0]
  assert 10 <= half.sum() <= 30                                   # Binomial(40, 0.5), seeded: ±3 sd
  np.testing.assert_array_equal(tone_levels(1.0, cutoff_hz=8000.0), kept)   # Nyquist: no-op
