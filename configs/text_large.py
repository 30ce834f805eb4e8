"""Large S5 language model on SentencePiece text, 8192-token context, for a TPU v4-128 slice.

Target slice: v4-128 (64 v4 chips, 32 GiB HBM each; libtpu topology v4:4x4x4). It also fits a
v5p-128 (64 chips, 95 GiB; topology v5p:4x4x4) as it is.

  # once: shard the corpus and train a tokenizer, then point data.source/data.tokenizer at them
  python tools/prepare_text.py --source=/data/corpus --output=gs://YOUR_BUCKET/text_ar
  python tools/train_tokenizer.py --source=gs://YOUR_BUCKET/text_ar --vocab_size=32000 \
      --output=gs://YOUR_BUCKET/tokenizer/text32k     # writes text32k.model
  # prove it fits before paying for the slice (no TPU needed; prints memory, FLOPs, MFU)
  python tools/aot_compile.py --config=configs/text_large.py --topology=v4:4x4x4
  # train
  export TPU_NAME=text-large ZONE=us-central2-b WORKDIR=gs://YOUR_BUCKET/runs/text_large
  ACCELERATOR_TYPE=v4-128 launch/tpu_pod.sh configs/text_large.py
  EVAL_ACCELERATOR_TYPE=v4-8 launch/tpu_pod.sh --eval configs/text_large.py \
      --config.mesh.fsdp=4   # the eval slice has 4 chips

Model: 48 residual S5 blocks, H=2048, P=2048 (1024 complex states with conj_sym) in 16 HiPPO
blocks, full GLU and a 2x MLP per block, bfloat16 matmuls with float32 parameters and scan,
every block rematerialised in the backward pass. Each step sees 128 packed rows of 8192 tokens,
two rows per chip. On a v5litepod-256 (v5e:16x16) use --config.data.batch_size=256, one row per
chip.

Expected AOT figures (memory, step time, MFU bound on v4, v5p and v5e):
docs/tpu.md#tpu-fit-proven-ahead-of-time
Expected training result: docs/results.md#pod-scale-configs-expected-not-yet-run
"""

from s5scale import defaults


def get_config():
  c = defaults.base_config()
  c.model.task = "lm"
  c.model.input_kind = "tokens"
  # At least the tokenizer's size (pieces + any appended PAD/BOS/EOS), rounded up to a multiple
  # of 128 so the embedding and head tile the MXU; ids past the tokenizer's are never seen.
  c.model.vocab_size = 32768
  c.model.num_layers = 48
  c.model.d_model = 2048
  c.model.ssm_size = 2048
  c.model.blocks = 16
  c.model.activation = "full_glu"
  c.model.mlp_ratio = 2
  c.model.compute_dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat = "full"            # saves only each block's input for the backward pass
  # The AOT figures are for the proven XLA scan; the Pallas kernel ("auto" on TPU) has not
  # been compiled for this config, nor run on a TPU (see configs/audio_large.py).
  c.model.scan_impl = "chunked"

  c.data.kind = "text"
  # Placeholders: run tools/prepare_text.py on your corpus (and train a SentencePiece model on
  # it, e.g. 32k pieces) and point these at the results.
  c.data.source = "gs://YOUR_BUCKET/text_ar"
  c.data.tokenizer = "gs://YOUR_BUCKET/tokenizer/text32k.model"  # tools/train_tokenizer.py
  c.data.seq_len = 8192
  c.data.batch_size = 128           # global: two packed rows per v4 chip
  c.data.num_workers = 4
  c.data.read_threads = 8

  c.optim.learning_rate = 6e-4
  c.optim.ssm_learning_rate = 3e-4
  c.optim.warmup_steps = 2000
  c.optim.weight_decay = 0.1
  c.optim.b2 = 0.95
  c.train.num_steps = 100_000
  c.train.log_every_steps = 50

  # Per slice (ICI): parameters and optimizer state sharded 16 ways, batch over all 64 chips.
  c.mesh.data = -1
  c.mesh.fsdp = 16
  c.mesh.model = 1
  c.mesh.dcn_data = -1              # across slices (DCN): one data-parallel replica per slice

  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.keep_every = 10_000
  c.eval.every_steps = 0            # the eval job (launch/tpu_pod.sh --eval) scores checkpoints
  c.eval.max_batches = 64
  c.eval.batch_size = 32            # 8 rows per chip on the v4-8 eval slice
  c.generate.length = 512
  return c
