"""Byte-level S5 LM on the Python standard library's source (the embedded default corpus).

  python -m s5scale.train --config=configs/text_small.py --workdir=workdirs/text_small
  python -m s5scale.evaluate --config=configs/text_small.py --workdir=workdirs/text_small --all

Expected (measured on a 2-core CPU, about 3 minutes in all): held-out bits per byte 2.60 after
2,000 steps (2.85 at step 1,000). The eval also reports xz -9e (1.96) and gzip -9 (2.06) on the
same 41 KB of held-out bytes; beating them needs far longer training (issue 9).
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
  c.optim.warmup_steps = 100
  c.train.num_steps = 2000
  c.train.log_every_steps = 50
  c.checkpoint.every_steps = 500
  c.eval.every_steps = 0
  c.eval.max_batches = 20
  return c
