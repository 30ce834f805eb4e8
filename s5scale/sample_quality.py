"""Sample quality by SaShiMi's SC09 protocol: IS, mIS, AM and FID, judged by a trained classifier.

  python -m s5scale.sample_quality --config=configs/spoken_digits_lm.py --workdir=LM_WORKDIR \
      --classifier_workdir=CLASSIFIER_WORKDIR [--step=N | --all | --watch] [--num_samples=N]
  python -m s5scale.sample_quality --samples_dir=DIR_OF_WAVS --classifier_workdir=... \
      --reference=DATA_SOURCE          # score any directory of clips

The first form samples --num_samples clips of generate.length from each LM checkpoint with the
project's recurrent sampler (s5scale/generate.py; generate.temperature, generate.top_p and
generate.seed apply), writes them to LM_WORKDIR/samples/quality/ and scores those WAV files; the
second scores the audio files in DIR. Either way a file is read exactly as the classifier's own
data is (s5scale/clip_scorer.py), and the classifier's architecture and data settings come from
CLASSIFIER_WORKDIR/config.json.

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
form records into --workdir if given, else DIR itself, at --step (default 0). Each result is
also printed as one JSON line; the last line on stdout holds is, mis, am, fid and num_samples.
Exit 2 on a bad config, a missing checkpoint or unreadable data.
"""

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from s5scale import checkpoint, cli, clip_scorer, data, evaluate, generate, metrics
from s5scale import defaults, parallel, sample_metrics
from s5scale.nn.model import S5Model

SPLIT = "samples"
CLIPS_TO_TENSORBOARD = 4

FLAGS = flags.FLAGS


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
  writer = metrics.MetricsWriter(os.path.join(workdir, "eval", "metrics.jsonl"),
                                 os.path.join(workdir, "tb", SPLIT))
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
  records = metrics.read_jsonl(os.path.join(workdir, "eval", "metrics.jsonl"))
  return {r["step"] for r in records
          if r.get("split") == SPLIT and r.get("classifier") == classifier_workdir
          and all(r.get(key) == value for key, value in sampling.items())}


class LMSampler:
  """Samples num_samples clips from an LM workdir's checkpoints with generate.py's sampler."""

  def __init__(self, config, workdir: str, num_samples: int):
    if config.model.task != "lm" or config.model.bidirectional or config.data.kind != "audio":
      raise cli.ConfigError("--config must be an audio LM (model.task='lm', data.kind='audio', "
                            "model.bidirectional=False)")
    self.config, self.workdir = config, workdir
    mesh = parallel.make_mesh({**config.mesh, "data": -1, "fsdp": 1, "model": 1})
    self.model = S5Model(**cli.model_kwargs(config.model))
    settings = config.generate
    self.prompt = generate.prompt_tokens(config.data, settings.prompt, num_samples)
    self.abstract = evaluate.abstract_eval_variables(self.model, config, mesh, self.prompt)
    self.sampler = generate.make_sampler(self.model, settings.length, settings.temperature,
                                         settings.top_p)
    # What a record is keyed on besides step and classifier, and what names the clips' folder:
    # another temperature or seed is another measurement of the same checkpoint.
    self.sampling = {"temperature": settings.temperature, "top_p": settings.top_p,
                     "seed": settings.seed}

  def wav_dir(self, step: int) -> str:
    """Writes this checkpoint's samples to samples/quality/step_<step>[_t<T>_p<P>][_s<seed>]/;
    returns it."""
    manager = checkpoint.open_readonly(self.workdir)
    checkpoint.check_architecture(manager, step, self.config.to_dict())
    variables = {k: v for k, v in checkpoint.restore_subset(manager, step, self.abstract).items()
                 if v}
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
    subdir = os.path.join("quality", f"step_{step}{tag}")
    generate.write_samples(self.workdir, step, self.config.data, tokens, None, subdir=subdir)
    return os.path.join(self.workdir, "samples", subdir)


def main(argv) -> int:
  del argv
  try:
    return run()
  except (cli.ConfigError, data.DataError, checkpoint.CheckpointError) as error:
    logging.error("%s: %s", type(error).__name__, error)
    return cli.EXIT_BAD_INPUT


def run() -> int:
  classifier_workdir = cli.workdir_path(FLAGS.classifier_workdir)
  if FLAGS.samples_dir:
    workdir = cli.workdir_path(FLAGS.workdir or FLAGS.samples_dir)
  elif FLAGS.config is None or FLAGS.workdir is None:
    raise cli.ConfigError("give --config and --workdir (sample an LM), or --samples_dir")
  else:
    workdir = cli.workdir_path(FLAGS.workdir)
  cli.setup_logging(workdir, "sample_quality")
  # "" is a source too: the embedded default corpus of data.kind.
  reference = FLAGS.reference if FLAGS.reference is not None else (
      FLAGS.config.data.source if FLAGS.config else None)
  if reference is None:
    raise cli.ConfigError("--reference=DATA_SOURCE is needed with --samples_dir and no --config")
  scorer = clip_scorer.ClipScorer.from_workdir(
      classifier_workdir, FLAGS.classifier_step,
      None if FLAGS.recompute_batch_stats < 0 else FLAGS.recompute_batch_stats)
  if FLAGS.samples_dir:
    clips, masks, _ = clip_scorer.read_wav_dir(FLAGS.samples_dir, scorer.sample_rate,
                                               scorer.clip_length)
    references = reference_scores(scorer, reference, len(clips))
    scores, _ = score_clips(scorer, clips, masks, references["real"])
    record(workdir, FLAGS.step or 0, scores, references, scorer, clips, scorer.sample_rate,
           sampling={})
    return 0
  num_samples = FLAGS.num_samples or FLAGS.config.generate.num_samples
  if num_samples < 2:
    raise cli.ConfigError(f"--num_samples={num_samples}: at least 2 clips are needed")
  references = reference_scores(scorer, reference, num_samples)
  lm = LMSampler(FLAGS.config, workdir, num_samples)
  sampling = lm.sampling
  while FLAGS.watch and not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    time.sleep(FLAGS.poll_seconds)
  while True:
    manager = checkpoint.open_readonly(workdir)
    pending = pending_steps(manager.all_steps(), workdir, classifier_workdir, sampling)
    for step in pending:
      clips, masks, _ = clip_scorer.read_wav_dir(lm.wav_dir(step), scorer.sample_rate,
                                                 scorer.clip_length)
      scores, _ = score_clips(scorer, clips, masks, references["real"])
      record(workdir, step, scores, references, scorer, clips, scorer.sample_rate, sampling)
    if not FLAGS.watch or FLAGS.config.train.num_steps in done_steps(workdir, classifier_workdir,
                                                                      sampling):
      return 0
    time.sleep(FLAGS.poll_seconds)


def pending_steps(available, workdir: str, classifier_workdir: str, sampling: dict) -> list[int]:
  """--step N, or every step not yet scored by this classifier at these sampling settings
  (--all, the default)."""
  available = sorted(available)
  if FLAGS.step is not None:
    if FLAGS.step not in available:
      raise checkpoint.CheckpointError(f"--step={FLAGS.step}: no checkpoint; available "
                                       f"{available}")
    return [FLAGS.step]
  if not available and not FLAGS.watch:
    raise checkpoint.CheckpointError(f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}")
  done = done_steps(workdir, classifier_workdir, sampling)
  return [s for s in available if s not in done]


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Audio LM config (configs/*.py); not needed "
                                  "with --samples_dir.", lock_config=True)
  flags.DEFINE_string("workdir", None, "LM run directory (records go to its eval/).")
  flags.DEFINE_string("classifier_workdir", None, "Training workdir of the judging classifier.")
  flags.DEFINE_integer("classifier_step", None, "Classifier checkpoint (default: the latest).")
  flags.DEFINE_integer("recompute_batch_stats", -1, "BatchNorm statistics of the classifier "
                       "recomputed on N training batches; 0: as saved; -1: its "
                       "eval.recompute_batch_stats.")
  flags.DEFINE_string("samples_dir", None, "Score the audio files in this directory instead.")
  flags.DEFINE_string("reference", None, "Data source whose held-out clips are the real data "
                      "(default: the LM config's data.source).")
  flags.DEFINE_integer("num_samples", None, "Clips per checkpoint (default generate.num_samples).")
  flags.DEFINE_integer("step", None, "Score this LM checkpoint only (or the step to record "
                       "with --samples_dir).")
  flags.DEFINE_bool("all", False, "Score every LM checkpoint not yet scored by this classifier "
                    "(the default).")
  flags.DEFINE_bool("watch", False, "Poll for new checkpoints; exit after the final step.")
  flags.DEFINE_float("poll_seconds", 10.0, "Polling interval for --watch.")
  flags.mark_flag_as_required("classifier_workdir")
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
