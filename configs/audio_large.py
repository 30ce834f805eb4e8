"""Large 8-bit mu-law next-sample S5 LM on raw 16 kHz audio, 8.2 s windows.

Target slice: v5litepod-256 (256 v5e chips, 16 GiB HBM each; libtpu topology v5e:16x16), or
several of them over DCN (mesh.dcn_data=-1 spreads the batch over however many slices there are;
keep one window per pair of chips, e.g. --config.data.batch_size=256 on two slices).

  # once: validate and shard the corpus, then point data.source at the output
  python tools/prepare_audio.py --source=/data/wavs --output=gs://YOUR_BUCKET/audio_ar
  # prove it fits before paying for the slice (no TPU needed; prints memory, FLOPs, MFU)
  python tools/aot_compile.py --config=configs/audio_large.py --topology=v5e:16x16
  python tools/aot_compile.py --config=configs/audio_large.py --topology=v5e:16x16 \
      --num_slices=2 --config.data.batch_size=256
  # train
  export TPU_NAME=audio-large ZONE=us-west4-a WORKDIR=gs://YOUR_BUCKET/runs/audio_large
  ACCELERATOR_TYPE=v5litepod-256 SPOT=1 launch/tpu_pod.sh configs/audio_large.py
  EVAL_ACCELERATOR_TYPE=v5litepod-8 launch/tpu_pod.sh --eval configs/audio_large.py \
      --config.mesh.fsdp=4   # the eval slice has 8 chips: fsdp=4 x context=2

Model: 32 residual S5 blocks, H=2048, P=2048 (1024 complex states with conj_sym) in 16 HiPPO
blocks, full GLU and a 2x MLP per block, bfloat16 matmuls and residual stream with float32
parameters, norm statistics and scan. Each step sees 128 windows of 131072 samples (8.2 s each,
SaShiMi's context): one window per pair of chips, whose mesh.context=2 axis splits its time in
two halves; the layers hand one state across (docs/design.md#mesh-and-logical-axes). Under the
cost model (docs/tpu.md) that beats splitting H over mesh.model=2, whose activation gathers
over one ICI link cost 6.3 s a step against 0.18 s: serial bound 8.9 s against 14.0 s.
model.remat="offload" keeps only each block's input for the backward pass, in host memory.

Expected AOT figures (memory, step time, MFU bound, with this scan and with the Pallas kernel):
docs/tpu.md#tpu-fit-proven-ahead-of-time
Expected training result: docs/results.md#pod-scale-configs-expected-not-yet-run
"""

from s5scale import defaults


def get_config():
  c = defaults.base_config()
  c.model.task = "lm"
  c.model.input_kind = "tokens"
  c.model.vocab_size = 256          # 2**data.bits
  c.model.num_layers = 32
  c.model.d_model = 2048
  c.model.ssm_size = 2048
  c.model.blocks = 16
  c.model.activation = "full_glu"
  c.model.mlp_ratio = 2
  c.model.compute_dtype = "bfloat16"
  c.model.residual_dtype = "bfloat16"  # halves the saved block inputs and the gathers
  c.model.scan_layers = True
  c.model.remat = "offload"         # saves only each block's input, in host memory (TPU)
  # The proven XLA scan. The Pallas kernel ("auto" on TPU) compiles into this step, but ahead of
  # time it needs more HBM and moves more bytes (docs/tpu.md#the-pallas-kernel-ahead-of-time),
  # and it has never run on a TPU: try it with --config.model.scan_impl=auto on a first run.
  c.model.scan_impl = "chunked"

  c.data.kind = "audio"
  # A placeholder: run tools/prepare_audio.py on your corpus and point this at its output.
  c.data.source = "gs://YOUR_BUCKET/audio_ar"
  c.data.sample_rate = 16000
  c.data.quantization = "mulaw"
  c.data.bits = 8
  c.data.seq_len = 131072          # 8.2 s at 16 kHz, SaShiMi's context
  c.data.batch_size = 128           # global: one window per pair of chips (mesh.context=2)
  c.data.num_workers = 4
  c.data.read_threads = 8

  c.optim.learning_rate = 1e-3
  c.optim.ssm_learning_rate = 5e-4
  c.optim.warmup_steps = 2000
  c.optim.weight_decay = 0.05
  c.train.num_steps = 200_000
  c.train.log_every_steps = 50

  # Per slice (ICI): each window's time split over context=2, parameters and optimizer state
  # over fsdp=16, and the batch over data x fsdp.
  c.mesh.data = -1
  c.mesh.context = 2
  c.mesh.fsdp = 16
  c.mesh.model = 1
  c.mesh.dcn_data = -1              # across slices (DCN): one data-parallel replica per slice

  c.checkpoint.every_steps = 1000
  c.checkpoint.every_minutes = 30   # 1000 steps is over an hour; a preemption loses at most 30 min
  c.checkpoint.keep = 3
  c.checkpoint.keep_every = 20_000
  c.eval.every_steps = 0            # the eval job (launch/tpu_pod.sh --eval) scores checkpoints
  c.eval.max_batches = 64
  c.eval.batch_size = 4             # one window per pair of chips on the v5litepod-8 eval slice
  c.generate.length = 5 * 16000
  return c
