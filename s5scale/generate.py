"""Samples audio or text from a checkpoint in recurrent mode:
`python -m s5scale.generate --config=... --workdir=DIR [--step=N]`.

Each run writes a new DIR/samples/run_<N>/ (N one above the largest existing run; nothing
earlier is overwritten): the samples (WAV or .txt), the prompt as the model saw it (prompt.txt,
or prompt.wav when an audio prompt was given) and settings.json; and DIR/tb/samples. The prompt,
--config.generate.prompt, is a text prefix, or `@FILE` to read the text prefix from FILE; for
audio models it is an audio file path. The sampler is s5scale/sampling.py.
"""

import sys

from absl import app, flags

from s5scale import cli

FLAGS = flags.FLAGS


def main(argv) -> int:
  del argv
  # Imported once the flags are checked, so that a bad config exits 2 without loading JAX.
  from s5scale import sampling  # pylint: disable=g-import-not-at-top
  return cli.exit_code(sampling.generate, FLAGS.config, cli.workdir_path(FLAGS.workdir),
                       FLAGS.step)


if __name__ == "__main__":
  cli.define_flags()
  flags.DEFINE_integer("step", None, "Checkpoint step to sample from (default: the latest).")
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
