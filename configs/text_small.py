"""Byte-level S5 LM on the Python standard library's source (the embedded default corpus).

  make train     # = the two commands below
  python -m s5scale.train --config=configs/text_small.py --workdir=workdirs/text_small
  python -m s5scale.evaluate --config=configs/text_small.py --workdir=workdirs/text_small --all

Sized for a 2-core CPU. The eval scores the first eval.max_batches
held-out batches, and runs xz -9e and gzip -9 on the very same bytes.
Expected result, wall time and model size: docs/results.md#text
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
