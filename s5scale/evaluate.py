"""Evaluates held-out data on checkpoints:
`python -m s5scale.evaluate --config=... --workdir=DIR [--step=N | --all | --watch]`.

Appends one record per (step, split) to DIR/eval/metrics.jsonl and skips steps already recorded
there. The zero-shot and diagnostic splits are described in s5scale/evaluation.py.
"""

import sys

from absl import app, flags

from s5scale import cli

FLAGS = flags.FLAGS


def main(argv) -> int:
  del argv
  # Imported once the flags are checked, so that a bad config exits 2 without loading JAX.
  from s5scale import evaluation  # pylint: disable=g-import-not-at-top
  return cli.exit_code(evaluation.run_eval_job, FLAGS.config, cli.workdir_path(FLAGS.workdir),
                       FLAGS.step, FLAGS.watch, FLAGS.poll_seconds)


if __name__ == "__main__":
  cli.define_flags()
  flags.DEFINE_integer("step", None, "Evaluate this checkpoint step only.")
  flags.DEFINE_bool("all", False, "Evaluate every checkpoint not yet evaluated (the default).")
  flags.DEFINE_bool("watch", False, "Poll for new checkpoints; exit after the final training step.")
  flags.DEFINE_float("poll_seconds", 10.0, "Polling interval for --watch.")
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
