"""Trains a deep S5 model: `python -m s5scale.train --config=configs/X.py --workdir=DIR`.

Relaunching with the same workdir resumes from the latest complete checkpoint. The loop itself is
s5scale/training.py.
"""

# Installed before the heavy imports below, so that a SIGTERM during start-up exits cleanly.
from s5scale import preemption  # pylint: disable=g-bad-import-order

PREEMPTION = preemption.PreemptionWatcher()

import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position

from s5scale import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv) -> int:
  del argv
  # Imported once the flags are checked, so that a bad config exits 2 without loading JAX.
  from s5scale import training  # pylint: disable=g-import-not-at-top
  return cli.exit_code(training.train, cli.FLAGS.config, cli.workdir_path(cli.FLAGS.workdir),
                       PREEMPTION)


if __name__ == "__main__":
  cli.define_flags()
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
