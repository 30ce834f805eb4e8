"""Samples audio or text from a checkpoint in recurrent mode:
`python -m s5scale.generate --config=... --workdir=DIR [--step=N]`.

Writes DIR/samples/ (WAV or .txt) and DIR/tb/samples; the sampler is s5scale/sampling.py.
"""

import sys

from absl import app, flags

from s5scale import cli, sampling

FLAGS = flags.FLAGS


def main(argv) -> int:
  del argv
  return cli.exit_code(sampling.generate, FLAGS.config, cli.workdir_path(FLAGS.workdir),
                       FLAGS.step)


if __name__ == "__main__":
  cli.define_flags()
  flags.DEFINE_integer("step", None, "Checkpoint step to sample from (default: the latest).")
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
