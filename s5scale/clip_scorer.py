"""A trained classifier as a judge of audio clips: class probabilities and penultimate features.

Library code of `python -m s5scale.sample_quality` (SaShiMi's SC09 protocol). Everything about the
classifier (architecture, sample rate, clip length, held-out rule) comes from its workdir's
config.json, so scoring needs no config file of its own:

  scorer = ClipScorer.from_workdir(CLASSIFIER_WORKDIR)
  probs, features = scorer.score(clips, masks)    # (N, L) waveforms -> (N, K), (N, H)

Clips are prepared as the classifier's own held-out data is: decoded, mono, resampled to its
data.sample_rate, peak-normalised, the first data.seq_len samples kept and shorter clips
zero-padded with mask 0.
"""

import itertools
import os

import jax
import numpy as np

from s5scale import cli, config_files, data, inference, steps, storage
from s5scale.data import audio as audio_lib
from s5scale.data import transforms
from s5scale.nn.model import S5Model


def fixed_length(waveform: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(n,) -> the first `length` samples zero-padded, and their mask (1 on real samples)."""
  clip, mask = np.zeros(length, np.float32), np.zeros(length, np.float32)
  kept = waveform[:length]
  clip[:kept.size], mask[:kept.size] = kept, 1.0
  return clip, mask


AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


def _audio_files(directory: str) -> list[str]:
  return sorted(os.fspath(p) for p in storage.path(directory).iterdir()
                if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())


def _read_clips(paths: list[str], sample_rate: int, length: int, where: str):
  """clips (N, length), masks and the paths kept; an undecodable file is skipped and logged
  (bad data: skip, count, log); none readable at all is a DataError."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  clips, masks, kept = [], [], []
  for path in paths:
    try:
      waveform = audio_lib.load_waveform(storage.path(path).read_bytes(), sample_rate)
    except audio_lib.UnreadableAudio as error:
      logging.warning("skipping %s: %s", path, error)
      continue
    clip, mask = fixed_length(waveform, length)
    clips.append(clip), masks.append(mask), kept.append(path)
  if not clips:
    raise data.DataError(f"no readable audio files ({', '.join(AUDIO_EXTENSIONS)}) in {where}")
  if len(kept) < len(paths):
    logging.warning("%d of %d files in %s were unreadable", len(paths) - len(kept), len(paths),
                    where)
  return np.stack(clips), np.stack(masks), kept


def read_wav_dir(directory: str, sample_rate: int, length: int):
  """Every audio file directly in `directory` (sorted) -> clips (N, length), masks, paths."""
  return _read_clips(_audio_files(directory), sample_rate, length, directory)


def read_clip_tree(directory: str, sample_rate: int, length: int):
  """The audio files directly in `directory` and in its class folders, laid out as a dataset
  (directory/<word>/*.wav) -> clips (N, length), masks, paths, and each clip's folder name ("" for
  a top-level file). Folders the data pipeline would not take as classes (_background_noise_,
  hidden ones) are left out. Only reads: nothing is created in `directory`."""
  if not storage.path(directory).is_dir():
    raise data.DataError(f"{directory} is not a directory")
  folders = sorted(entry.name for entry in storage.path(directory).iterdir()
                   if transforms.usable_label(entry.name) and entry.is_dir())
  paths = _audio_files(directory)
  names = [""] * len(paths)
  for folder in folders:
    files = _audio_files(storage.join(directory, folder))
    paths += files
    names += [folder] * len(files)
  clips, masks, kept = _read_clips(paths, sample_rate, length,
                                   f"{directory} or its class folders")
  folder_of = dict(zip(paths, names))
  return clips, masks, kept, [folder_of[path] for path in kept]


def white_noise(num_clips: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Peak-normalised Gaussian white noise, (num_clips, length), full mask: the floor."""
  noise = np.random.default_rng(seed).standard_normal((num_clips, length))
  noise /= np.max(np.abs(noise), axis=1, keepdims=True)
  return noise.astype(np.float32), np.ones((num_clips, length), np.float32)


class ClipScorer:
  """A classifier checkpoint restored onto one device, scoring batches of waveforms."""

  def __init__(self, config, variables: dict, step: int, workdir: str):
    self.config, self.step, self.workdir = config, step, workdir
    self.model = S5Model.from_config(config.model)
    self.variables = variables
    self.batch_size = config.eval.batch_size or config.data.batch_size
    self._score = jax.jit(lambda variables, inputs, mask: self.model.apply(
        variables, inputs, mask=mask, method=S5Model.pooled_features))

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None,
                   recompute_batch_stats: int | None = None):
    """The classifier of a training workdir (latest step by default).

    recompute_batch_stats: None keeps the run's eval.recompute_batch_stats; N > 0 recomputes
    BatchNorm statistics on its first N training batches (s5scale/steps.py), 0 keeps them as saved.
    """
    config = config_files.load_run_config(workdir)
    if config.model.task != "classify" or config.model.num_classes < 1:
      raise cli.ConfigError(f"{workdir}/config.json: model.task={config.model.task!r} with "
                            f"model.num_classes={config.model.num_classes}; the judge must be a "
                            "trained classifier")
    mesh = inference.data_parallel_mesh(config, jax.devices()[:1])
    model, variables, step, _ = inference.restore_model(workdir, config, step, mesh)
    if recompute_batch_stats is None:
      recompute_batch_stats = config.eval.recompute_batch_stats
    if recompute_batch_stats and variables.get("batch_stats"):
      train_batches = data.make_iterator(config.data, "train")
      variables["batch_stats"] = steps.recompute_batch_stats(
          jax.jit(steps.make_batch_statistics_step(model)), variables["params"],
          variables["batch_stats"], itertools.islice(train_batches, recompute_batch_stats))
    return cls(config, variables, step, workdir)

  @property
  def sample_rate(self) -> int:
    return self.config.data.sample_rate

  @property
  def clip_length(self) -> int:
    return self.config.data.seq_len

  def score(self, clips: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) waveforms and masks -> probabilities (N, K) float64, features (N, H) float64."""
    probs, features = [], []
    for start in range(0, len(clips), self.batch_size):
      rows = clips[start:start + self.batch_size]
      pad = self.batch_size - len(rows)   # one compiled shape for every batch
      inputs = np.pad(rows, ((0, pad), (0, 0)))[..., None].astype(np.float32)
      mask = np.pad(masks[start:start + self.batch_size], ((0, pad), (0, 0)))
      batch_features, logits = self._score(self.variables, inputs, mask.astype(np.float32))
      probs.append(np.asarray(jax.nn.softmax(logits), np.float64)[:len(rows)])
      features.append(np.asarray(batch_features, np.float64)[:len(rows)])
    return np.concatenate(probs), np.concatenate(features)

  def heldout_clips(self, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The held-out clips of a labelled source under this classifier's settings (its held-out
    rule, rate and length): clips (N, L), masks (N, L), labels (N,) as its label ids."""
    data_config = self.config.data.copy_and_resolve_references()
    data_config.source = source
    clips, masks, labels = [], [], []
    for batch in data.make_iterator(data_config, "heldout", num_epochs=1):
      real = batch["mask"].max(axis=1) > 0      # the last batch is padded with empty rows
      clips.append(batch["inputs"][real, :, 0]), masks.append(batch["mask"][real])
      labels.append(batch["label"][real])
    if not clips:
      raise data.DataError(f"the held-out split of {source!r} is empty")
    return np.concatenate(clips), np.concatenate(masks), np.concatenate(labels)
