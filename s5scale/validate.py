"""Checks a config without running anything:
`python -m s5scale.validate --config=configs/X.py [--config.a.b=v ...]`; exit 0 valid, 2 not.

The launcher runs it on its own machine before it creates a slice. cli.parse_flags does the
checking (s5scale/config_check.py), as it does for every program.
"""

import sys

from absl import app

from s5scale import cli


def main(argv) -> int:
  del argv  # cli.parse_flags has already checked the config, or exited 2
  print(f"valid: {cli.flag_value(sys.argv, 'config')} with "
        f"{sum(a.startswith('--config.') for a in sys.argv)} override(s)")
  return 0


if __name__ == "__main__":
  cli.define_flags(workdir=False)
  app.run(lambda argv: sys.exit(main(argv)),
          flags_parser=lambda argv: cli.parse_flags(argv, runs_jax=False))
