"""audio_large (configs/audio_large.py: 1.08B parameters) on 65 s windows: 1,048,576 samples at
16 kHz, on a v5litepod-256 (libtpu topology v5e:16x16).

  python tools/aot_compile.py --config=configs/audio_xl.py --topology=v5e:16x16

Each step sees 64 windows (the fewest the 64 hosts of the slice can load whole rows of) in
optim.grad_accum_steps=4 microbatches of 16. mesh.context=16 splits each window's time in 16
segments of 65,536 samples, one per chip, and fsdp=16 shards parameters and the batch: every
chip scans the same 65,536-sample segment as in audio_large, and each layer hands one
(batch, P) state across segments with one all-gather.

AOT figures on v5e:16x16 (docs/tpu.md#tpu-fit-proven-ahead-of-time): 11.41 GiB per chip (71% of
HBM; 8.0 GiB of block inputs offloaded to host), serial bound 37.3 s a step, serial MFU 23.0%
(target 40%, not met): HBM traffic 18.2 s (the chunked scan's passes over the states), compute
12.2 s, host offload 4.4 s, collectives 2.5 s. Overlapped bound 18.2 s, MFU <= 47.1%.
"""

import os
import runpy

# The sibling file by path: configs/ is not a package, and the CLI loads configs by path too.
audio_large = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                          "audio_large.py"))


def get_config():
  c = audio_large["get_config"]()
  c.data.seq_len = 1_048_576        # 65.5 s at 16 kHz
  c.data.batch_size = 64            # divisible by the slice's 64 hosts
  c.optim.grad_accum_steps = 4      # 16 windows per microbatch: 65,536 samples per chip
  c.mesh.context = 16
  c.mesh.fsdp = 16
  c.generate.length = 60 * 16000
  return c
