"""8-bit mu-law next-sample S5 LM on the embedded procedural audio corpus (16 kHz).

  python -m s5scale.train --config=configs/audio_small.py --workdir=workdirs/audio_small

The eval also reports xz -9e and gzip -9 on the same mu-law codes.
Expected result: docs/results.md#audio
"""

from s5scale import defaults


def get_config():
  c = defaults.base_config()
  c.model.num_layers = 4
  c.model.d_model = 64
  c.model.ssm_size = 64
  c.model.blocks = 2
  c.model.vocab_size = 256
  c.data.kind = "audio"
  c.data.sample_rate = 16000
  c.data.batch_size = 8
  c.data.seq_len = 2048
  c.optim.warmup_steps = 30
  c.train.num_steps = 300
  c.checkpoint.every_steps = 100
  c.eval.every_steps = 0
  c.eval.max_batches = 10
  return c
