"""Sample quality by SaShiMi's SC09 protocol: IS, mIS, AM and FID, judged by a trained classifier.

  python -m s5scale.sample_quality --config=configs/spoken_digits_lm.py --workdir=LM_WORKDIR \
      --classifier_workdir=CLASSIFIER_WORKDIR [--step=N | --all | --watch] [--num_samples=N]
  python -m s5scale.sample_quality --samples_dir=DIR_OF_WAVS --workdir=RECORDS_DIR \
      --classifier_workdir=... --reference=DATA_SOURCE     # score any directory of clips

DIR_OF_WAVS is only read: its clips, and those of its class folders DIR_OF_WAVS/<word>/*.wav
(which also give samples/accuracy against the folder names); logs and records go to RECORDS_DIR.

What is sampled, scored and recorded: s5scale/sample_scoring.py.
"""

import sys

from absl import app, flags

from s5scale import cli

FLAGS = flags.FLAGS


def main(argv) -> int:
  del argv
  # Imported once the flags are checked, so that a bad config exits 2 without loading JAX.
  from s5scale import sample_scoring  # pylint: disable=g-import-not-at-top
  return cli.exit_code(
      lambda: sample_scoring.run_sample_quality(
          FLAGS.config, FLAGS.workdir and cli.workdir_path(FLAGS.workdir),
          cli.workdir_path(FLAGS.classifier_workdir),
          samples_dir=FLAGS.samples_dir and cli.workdir_path(FLAGS.samples_dir),
          reference=FLAGS.reference, classifier_step=FLAGS.classifier_step,
          recompute_batch_stats=(None if FLAGS.recompute_batch_stats < 0
                                 else FLAGS.recompute_batch_stats),
          num_samples=FLAGS.num_samples, step=FLAGS.step, watch=FLAGS.watch,
          poll_seconds=FLAGS.poll_seconds))


if __name__ == "__main__":
  cli.define_flags(config_required=False)   # the LM's config; none with --samples_dir
  flags.DEFINE_string("classifier_workdir", None, "Training workdir of the judging classifier.")
  flags.DEFINE_integer("classifier_step", None, "Classifier checkpoint (default: the latest).")
  flags.DEFINE_integer("recompute_batch_stats", -1, "BatchNorm statistics of the classifier "
                       "recomputed on N training batches; 0: as saved; -1: its "
                       "eval.recompute_batch_stats.")
  flags.DEFINE_string("samples_dir", None, "Score the audio files in this directory and in its "
                      "class folders (DIR/<word>/*.wav) instead; DIR is only read.")
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
