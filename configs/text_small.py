"""Byte-level S5 LM on the Python standard library's source (the embedded default corpus).

  make train     # = the two commands below; about 25 minutes on a 2-core CPU
  python -m s5scale.train --config=configs/text_small.py --workdir=workdirs/text_small
  python -m s5scale.evaluate --config=configs/text_small.py --workdir=workdirs/text_small --all

Sized to the issue-9 budget, 30 minutes of training on a 2-core CPU: 8,000 steps of 2,048 bytes
(16M bytes, half an epoch of the 31 MB corpus), by a 4-layer model of width 256 (0.93M
parameters).
The eval scores the first 40,960 held-out bytes, and runs xz -9e and gzip -9 on the very same
bytes; README "Results" has the figures.
"""

from s5scale import defaults


def get_config():
  c = defaults.base_config()
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.ssm_size = 256
  c.model.blocks = 4
  c.model.vocab_size = 260   # 256 bytes + specials
  c.data.kind = "text"
  c.data.batch_size = 4
  c.data.seq_len = 512
  c.optim.warmup_steps = 100
  c.train.num_steps = 8000
  c.train.log_every_steps = 100
  c.checkpoint.every_steps = 2000
  c.eval.every_steps = 1000
  c.eval.max_batches = 20
  return c
