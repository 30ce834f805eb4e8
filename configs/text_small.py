"""Byte-level S5 LM on the Python standard library's source (the embedded default corpus).

  python -m s5scale.train --config=configs/text_small.py --workdir=workdirs/text_small
  python -m s5scale.evaluate --config=configs/text_small.py --workdir=workdirs/text_small --all

Expected: held-out bits per byte falls below ~3.0 within the default 300 steps on a 2-core CPU.
"""

from s5scale import defaults


def get_config():
  c = defaults.base_config()
  c.model.num_layers = 4
  c.model.d_model = 128
  c.model.ssm_size = 128
  c.model.blocks = 4
  c.model.vocab_size = 260   # 256 bytes + specials
  c.data.kind = "text"
  c.data.batch_size = 8
  c.data.seq_len = 256
  c.optim.warmup_steps = 30
  c.train.num_steps = 300
  c.train.log_every_steps = 10
  c.checkpoint.every_steps = 100
  c.eval.every_steps = 0
  c.eval.max_batches = 20
  return c
