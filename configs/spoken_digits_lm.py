"""8-bit mu-law next-sample S5 LM on spoken digits, held out by voice (16 kHz).

  make results-audio    # = make_spoken_digits.py, then train, evaluate and sample as below
  python tools/make_spoken_digits.py --output=data/spoken_digits
  python -m s5scale.train --config=configs/spoken_digits_lm.py --workdir=workdirs/spoken_digits_lm
  python -m s5scale.evaluate --config=configs/spoken_digits_lm.py --workdir=... --all
  python -m s5scale.generate --config=configs/spoken_digits_lm.py --workdir=...   # -> samples/

The held-out split is every clip of 10% of the voices (file names <voice>_nohash_..., see
docs/data.md#held-out-split), the same voices configs/speech_commands.py holds out. The eval
reports bits per sample on all of their clips, beside xz -9e and gzip -9 on the same mu-law bytes.

Width 256 on random 2,048-sample crops, 8 per step, sized to a 30-minute training budget on a
2-core CPU. The variant trained on whole one-second clips (`make results-audio-whole-clips`, as
SaShiMi trains on SC09) came out worse at about the same time.
Expected result, and the recipes tried on the way: docs/results.md#audio
"""

from s5scale import defaults


def get_config():
  c = defaults.base_config()
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.ssm_size = 256
  c.model.blocks = 4
  c.model.vocab_size = 256
  c.data.kind = "audio"
  c.data.source = "data/spoken_digits"
  c.data.sample_rate = 16000
  c.data.quantization = "mulaw"
  c.data.bits = 8
  c.data.batch_size = 8
  c.data.seq_len = 2048
  c.data.heldout_fraction = 0.1
  c.optim.learning_rate = 3e-3
  c.optim.ssm_learning_rate = 1.5e-3
  c.optim.warmup_steps = 50
  c.train.num_steps = 1100      # the training budget (docstring), with a margin
  c.train.log_every_steps = 50
  c.checkpoint.every_steps = 275
  c.eval.every_steps = 0
  c.eval.batch_size = 8
  c.eval.seq_len = 16000        # whole clips: trained on 2,048-sample crops, scored in context
  c.generate.num_samples = 4
  c.generate.length = 16000
  return c
