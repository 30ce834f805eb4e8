"""configs/spoken_digits_lm.py on long recordings, with the SSM state carried across windows.

  make results-carried   # = the long recordings, then both runs below, evaluated and curved
  python tools/make_spoken_digits.py --output=data/long_digits --long_seconds=120
  python -m s5scale.train --config=configs/long_digits_lm.py --workdir=workdirs/long_digits_carried
  python -m s5scale.train --config=configs/long_digits_lm.py --workdir=workdirs/long_digits_fresh \
      --config.data.carry_state=False

Each recording is two minutes of one espeak-ng voice reading random digit strings; whole voices
are held out (data.heldout_fraction=0.1: 2 of the 24 voices). The steps, window (2,048 samples),
batch and model are spoken_digits_lm's. With data.carry_state each batch row streams recordings
window after window with every layer's state carried from step to step (docs/carried_state.md);
with it off, rows are random 2,048-sample crops, as spoken_digits_lm trains. eval.carry_state
scores every held-out recording both ways, in 1-second fresh windows and streamed whole.
"""

import os
import runpy

# The sibling file by path: configs/ is not a package, and the CLI loads configs by path too.
spoken_digits_lm = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "spoken_digits_lm.py"))


def get_config():
  c = spoken_digits_lm["get_config"]()
  c.data.source = "data/long_digits"
  c.data.carry_state = True
  c.eval.carry_state = True
  return c
