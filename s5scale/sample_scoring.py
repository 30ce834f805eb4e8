"""Sample quality by SaShiMi's SC09 protocol: IS, mIS, AM and FID, judged by a trained classifier.

The library behind `python -m s5scale.sample_quality` (s5scale/sample_quality.py):

  python -m s5scale.sample_quality --config=configs/spoken_digits_lm.py --workdir=LM_WORKDIR \
      --classifier_workdir=CLASSIFIER_WORKDIR [--step=N | --all | --watch] [--num_samples=N]
  python -m s5scale.sample_quality --samples_dir=DIR_OF_WAVS --workdir=RECORDS_DIR \
      --classifier_workdir=... --reference=DATA_SOURCE     # score any directory of clips

The first form samples --num_samples clips of generate.length from each LM checkpoint with the
project's recurrent sampler (s5scale/sampling.py; generate.temperature, generate.top_p and
generate.seed apply), writes them to LM_WORKDIR/samples/quality/ and scores those WAV files; the
second scores the audio files in DIR and its class folders. Either way a file is read exactly as
the classifier's own data is (s5scale/clip_scorer.py), and the classifier's architecture and data
settings come from CLASSIFIER_WORKDIR/config.json.

Every run also scores, with the same classifier, the same number of clips of two fixed
references: held-out real clips of the reference source (the ceiling) and white noise (the floor).
The reference source (--reference; default the LM config's data.source) gives its held-out clips,
split alternately in two: the even ones are the real data that FID and AM compare with, the odd
ones give the ceiling (num_samples of them, spread evenly), so the ceiling is never compared with
itself.

Records: one per (LM checkpoint, classifier, generate.temperature, generate.top_p,
generate.seed) in WORKDIR/eval/metrics.jsonl, split "samples", keys samples/{is,mis,am,fid,
num_samples,class_counts,silent_fraction} (silent: no sample above -40 dBFS, which a classifier
may still call a digit with confidence, so read IS beside it), samples/ceiling/...,
samples/noise/..., and the sampling settings `temperature`, `top_p` and `seed`
(and tensorboard scalars and the first few clips under WORKDIR/tb/samples). The --samples_dir
form reads DIR's top-level clips and those of its class folders (DIR/<word>/*.wav, laid out as
a dataset), writes nothing into DIR, and records into --workdir (required) at --step (default
0); when the folder names are classes of the classifier, samples/accuracy is the fraction of
those clips it calls by their folder's name. Each result is also printed as one JSON line; the
last line on stdout holds is, mis, am, fid and num_samples.
Exit 2 on a bad config, a missing checkpoint or unreadable data.
"""

import json
import os
import time

import numpy as np
from absl import logging

from s5scale import cli, clip_scorer, data, defaults, inference, metrics, sample_metrics
from s5scale import sampling as sampling_lib
from s5scale import storage
from s5scale.checkpoint_follower import CheckpointFollower
from s5scale.nn.model import S5Model

SPLIT = "samples"
CLIPS_TO_TENSORBOARD = 4


def reference_scores(scorer, reference_source: str, num_clips: int) -> dict:
  """Probabilities/features of the real reference (even held-out clips), and the ceiling and
  floor scores against it, each over num_clips clips (fewer if the ceiling half is smaller)."""
  clips, masks, labels = scorer.heldout_clips(reference_source)
  if len(clips) < 4:
    raise data.DataError(f"the held-out split of {reference_source!r} has {len(clips)} clips; "
                         "at least 4 are needed (two references of at least 2)")
  reference_probs, reference_features = scorer.score(clips[0::2], masks[0::2])
  # Spread over the whole odd half: held-out clips come in source order (one word after
  # another), so its first num_clips clips would leave whole classes out of the ceiling.
  odd = np.arange(1, len(clips), 2)
  ceiling = odd[np.linspace(0, len(odd) - 1, min(num_clips, len(odd))).round().astype(int)]
  real = dict(probs=reference_probs, features=reference_features)
  noise = clip_scorer.white_noise(len(ceiling), scorer.clip_length)
  ceiling_scores, ceiling_probs = score_clips(scorer, clips[ceiling], masks[ceiling], real)
  results = {"ceiling": ceiling_scores, "noise": score_clips(scorer, *noise, real)[0]}
  same_classes = data.label_names(_with_source(scorer.config.data, reference_source)) == (
      data.label_names(scorer.config.data))
  if same_classes:   # label ids mean the classifier's classes only then
    results["ceiling"]["accuracy"] = float(np.mean(
        np.argmax(ceiling_probs, axis=1) == labels[ceiling]))
    # The true classes of the ceiling clips: a ceiling is only a ceiling if it holds them all.
    results["ceiling"]["label_counts"] = np.bincount(
        labels[ceiling], minlength=ceiling_probs.shape[1]).tolist()
  return {"real": real, **results}


def _with_source(data_config, source: str):
  data_config = data_config.copy_and_resolve_references()
  data_config.source = source
  return data_config


def score_clips(scorer, clips, masks, real: dict) -> tuple[dict, np.ndarray]:
  """The protocol's scores of clips against the real reference (its probs and features), with
  the class counts and the silent fraction; and the clips' class probabilities (N, K)."""
  probs, features = scorer.score(clips, masks)
  scores = sample_metrics.all_scores(probs, features, real["probs"], real["features"])
  # How many clips the classifier gives each class: "61 of 64 called six" shows up here.
  scores["class_counts"] = np.bincount(np.argmax(probs, axis=1),
                                       minlength=probs.shape[1]).tolist()
  scores["silent_fraction"] = sample_metrics.silent_fraction(clips, masks)
  return scores, probs


def record(workdir: str, step: int, scores: dict, references: dict, scorer, clips,
           sample_rate: int, sampling: dict) -> dict:
  """Appends the split-"samples" record, logs clips to tensorboard, prints the JSON line.

  sampling: the sampler's temperature, top_p and seed ({} for clips read from a directory), kept
  in the record because the same checkpoint scores very differently at another temperature.
  """
  flat = {f"{SPLIT}/{k}": v for k, v in scores.items()}
  for name in ("ceiling", "noise"):
    flat.update({f"{SPLIT}/{name}/{k}": v for k, v in references[name].items()})
  writer = metrics.MetricsWriter(storage.join(workdir, "eval", "metrics.jsonl"),
                                 storage.join(workdir, "tb", SPLIT))
  writer.write(step, flat, split=SPLIT, classifier=scorer.workdir, classifier_step=scorer.step,
               **sampling)
  if writer.tensorboard is not None:
    for index, clip in enumerate(clips[:CLIPS_TO_TENSORBOARD]):
      writer.tensorboard.add_audio(f"{SPLIT}/{index}", clip, step, sample_rate=sample_rate)
  writer.close()
  line = {"step": step, **scores, "ceiling": references["ceiling"], "noise": references["noise"],
          "classifier": scorer.workdir, "classifier_step": scorer.step, **sampling}
  print(json.dumps(line), flush=True)
  logging.info("samples step %d: IS %.3f mIS %.3f AM %.3f FID %.3f, %.0f%% silent (ceiling IS "
               "%.3f FID %.3f; noise IS %.3f FID %.3f)", step, scores["is"], scores["mis"],
               scores["am"], scores["fid"], 100 * scores["silent_fraction"],
               references["ceiling"]["is"], references["ceiling"]["fid"],
               references["noise"]["is"], references["noise"]["fid"])
  return line


def done_steps(workdir: str, classifier_workdir: str, sampling: dict) -> set[int]:
  """LM steps already scored by this classifier at these sampling settings (one record each)."""
  records = metrics.read_jsonl(storage.join(workdir, "eval", "metrics.jsonl"))
  return {r["step"] for r in records
          if r.get("split") == SPLIT and r.get("classifier") == classifier_workdir
          and all(r.get(key) == value for key, value in sampling.items())}


class LMSampler:
  """Samples num_samples clips from an LM's restored variables with s5scale/sampling.py."""

  def __init__(self, config, workdir: str, num_samples: int):
    if config.model.task != "lm" or config.model.bidirectional or config.data.kind != "audio":
      raise cli.ConfigError("--config must be an audio LM (model.task='lm', data.kind='audio', "
                            "model.bidirectional=False)")
    self.config, self.workdir = config, workdir
    self.model = S5Model.from_config(config.model)
    settings = config.generate
    self.prompt = sampling_lib.prompt_tokens(config.data, settings.prompt, num_samples)
    self.abstract = inference.abstract_variables(
        self.model, inference.data_parallel_mesh(config), self.prompt)
    self.sampler = sampling_lib.make_sampler(self.model, settings.length, settings.temperature,
                                             settings.top_p)
    # What a record is keyed on besides step and classifier, and what names the clips' folder:
    # another temperature or seed is another measurement of the same checkpoint.
    self.sampling = {"temperature": settings.temperature, "top_p": settings.top_p,
                     "seed": settings.seed}

  def wav_dir(self, step: int, variables: dict) -> str:
    """Writes samples of `step` to samples/quality/step_<step>[_t<T>_p<P>][_s<seed>]/, and
    returns that folder."""
    start = time.time()
    tokens = np.asarray(self.sampler(variables, self.prompt, self.config.generate.seed))
    logging.info("sampled %d x %d from step %d in %.1f s", *tokens.shape, step,
                 time.time() - start)
    # Settings other than defaults.py's get their own folder, so a sweep keeps every setting's
    # clips.
    default = defaults.base_config().generate
    sampling = self.sampling
    tag = "" if (sampling["temperature"], sampling["top_p"]) == (
        default.temperature, default.top_p) else "_t{temperature:g}_p{top_p:g}".format(**sampling)
    tag += f"_s{sampling['seed']}" if sampling["seed"] != default.seed else ""
    subdir = f"quality/step_{step}{tag}"
    sampling_lib.write_samples(self.workdir, step, self.config.data, tokens, None, subdir=subdir)
    return storage.join(self.workdir, "samples", subdir)


def score_directory(samples_dir: str, workdir: str, scorer, reference: str, step: int) -> int:
  """The --samples_dir form: scores the audio files in samples_dir and its class folders, and
  records into workdir. Clips in folders named after the classifier's classes also give
  samples/accuracy, the fraction the classifier calls by their folder's name."""
  clips, masks, _, folders = clip_scorer.read_clip_tree(samples_dir, scorer.sample_rate,
                                                        scorer.clip_length)
  references = reference_scores(scorer, reference, len(clips))
  scores, probs = score_clips(scorer, clips, masks, references["real"])
  classes = data.label_names(scorer.config.data)
  labelled = sorted({name for name in folders if name})
  if labelled and set(labelled) <= set(classes):
    rows = np.array([i for i, name in enumerate(folders) if name])
    labels = np.array([classes.index(folders[i]) for i in rows])
    scores["accuracy"] = float(np.mean(np.argmax(probs[rows], axis=1) == labels))
  elif labelled:
    logging.warning("no samples/accuracy: folders %s are not all classes of the classifier (%s)",
                    labelled, classes)
  record(workdir, step, scores, references, scorer, clips, scorer.sample_rate, sampling={})
  return 0


def score_checkpoints(config, workdir: str, scorer, reference: str, num_samples: int, *,
                      only_step: int | None, watch: bool, poll_seconds: float) -> int:
  """Samples and scores every LM checkpoint of workdir not yet scored by this classifier at
  these sampling settings (or only_step); with `watch`, until the trainer's final step."""
  if num_samples < 2:
    raise cli.ConfigError(f"--num_samples={num_samples}: at least 2 clips are needed")
  references = reference_scores(scorer, reference, num_samples)
  lm = LMSampler(config, workdir, num_samples)

  def done() -> set[int]:
    return done_steps(workdir, scorer.workdir, lm.sampling)

  def on_skip(step: int, why: str) -> None:
    logging.warning("skipping LM checkpoint step %d: %s", step, why)

  follower = CheckpointFollower(workdir, SPLIT, config, only_step=only_step, watch=watch,
                                poll_seconds=poll_seconds)
  for step, variables in follower.checkpoints(lm.abstract, done, on_skip):
    clips, masks, _ = clip_scorer.read_wav_dir(lm.wav_dir(step, variables), scorer.sample_rate,
                                               scorer.clip_length)
    scores, _ = score_clips(scorer, clips, masks, references["real"])
    record(workdir, step, scores, references, scorer, clips, scorer.sample_rate, lm.sampling)
  return 0


def _check_samples_dir(samples_dir: str, workdir: str | None) -> None:
  """--samples_dir is only read (it may be read-only, or someone else's): records and logs go
  to --workdir, which must be given and lie outside it."""
  if not workdir:
    raise cli.ConfigError("--samples_dir needs --workdir=DIR for the logs, eval/ and tb/ (nothing "
                          "is written into --samples_dir)")
  if not storage.path(samples_dir).is_dir():
    raise data.DataError(f"--samples_dir {samples_dir} does not exist or is not a directory")
  if _inside(workdir, samples_dir):
    raise cli.ConfigError(f"--workdir {workdir} lies inside --samples_dir {samples_dir}, which "
                          "is never written into")


def _inside(path: str, folder: str) -> bool:
  """Whether path is folder or lies under it (local paths with symlinks resolved; URLs as
  written)."""
  if not storage.is_cloud(path) and not storage.is_cloud(folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
  path, folder = path.rstrip("/"), folder.rstrip("/")
  return path == folder or path.startswith(folder + "/")


def run_sample_quality(config, workdir: str | None, classifier_workdir: str, *,
                       samples_dir: str | None = None, reference: str | None = None,
                       classifier_step: int | None = None,
                       recompute_batch_stats: int | None = None, num_samples: int | None = None,
                       step: int | None = None, watch: bool = False,
                       poll_seconds: float = 10.0) -> int:
  """Both forms of `python -m s5scale.sample_quality` (module docstring): the LM checkpoints of
  workdir sampled and scored, or the clips of samples_dir scored."""
  if samples_dir:
    _check_samples_dir(samples_dir, workdir)
  elif config is None or workdir is None:
    raise cli.ConfigError("give --config and --workdir (sample an LM), or --samples_dir")
  cli.setup_logging(workdir, "sample_quality")
  # "" is a source too: the embedded default corpus of data.kind.
  if reference is None:
    if config is None:
      raise cli.ConfigError("--reference=DATA_SOURCE is needed with --samples_dir and no --config")
    reference = config.data.source
  scorer = clip_scorer.ClipScorer.from_workdir(classifier_workdir, classifier_step,
                                               recompute_batch_stats)
  if samples_dir:
    return score_directory(samples_dir, workdir, scorer, reference, step or 0)
  return score_checkpoints(config, workdir, scorer, reference,
                           num_samples or config.generate.num_samples, only_step=step,
                           watch=watch, poll_seconds=poll_seconds)
