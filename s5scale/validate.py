"""Checks a config without running anything:
`python -m s5scale.validate --config=configs/X.py [--config.a.b=v ...]`; exit 0 valid, 2 not.

The launcher runs it on its own machine before it creates a slice. cli.parse_flags does the
checking (s5scale/config_check.py), as it does for every program.
"""

import sys

from absl import app
from ml_collections import config_flags

from s5scale import cli


def main(argv) -> int:
  del argv  # cli.parse_flags has already checked the config, or exited 2
  return 0


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                  lock_config=True)
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
