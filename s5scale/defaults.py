"""Every config key s5scale knows, with its default.

Experiment files in configs/ start from `base_config()` and change what they need. Keeping all keys
here means an unknown `--config.x.y` override is caught (ml_collections configs are locked), and the
error can list the valid keys.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict(dict(
      task="lm",                    # "lm" (next-token) or "classify"
      input_kind="tokens",          # "tokens" (embedding) or "continuous" (linear encoder)
      vocab_size=256,               # tokens; at least data.vocab_size (bytes: 260 with specials)
      num_classes=0,                # classify: 0 = the number of label folders in data.source
      num_layers=4,
      d_model=128,                  # H
      ssm_size=128,                 # P (P/2 complex states with conj_sym)
      blocks=4,                     # J
      conj_sym=True,
      bidirectional=False,
      discretization="zoh",         # "zoh" or "bilinear"
      c_init="trunc_standard_normal",  # or "lecun_normal", "complex_normal"
      dt_min=1e-3,
      dt_max=1e-1,
      clip_eigs=False,
      step_rescale=1.0,
      scan_impl="default",          # "default" (fast) or "reference" (associative_scan)
      norm="layer",                 # "layer", "rms" or "batch"
      prenorm=True,
      activation="half_glu1",       # "full_glu", "half_glu1", "half_glu2", "gelu"
      mlp_ratio=0,                  # 0: no MLP after the SSM
      dropout=0.0,
      pooling="mean",               # classify: "mean" or "last"
      compute_dtype="float32",      # matmul dtype; parameters stay float32
      residual_dtype="float32",     # the residual stream between blocks: "float32" or "bfloat16"
      scan_layers=True,             # nn.scan over depth: compile time flat in num_layers
      # jax.checkpoint policy per block: "none"; "full" saves only each block's input; "offload"
      # keeps that input in host memory instead of HBM; "dots" also saves matmul outputs
      remat="none",
  ))

  c.data = ml_collections.ConfigDict(dict(
      kind="text",                  # "text" or "audio"
      source="",                    # "" = embedded default corpus; else dir, glob or *.array_record
      tokenizer="bytes",            # text: "bytes" or a path to a SentencePiece .model
      batch_size=8,                 # global, across all processes
      seq_len=256,
      seed=0,
      heldout_fraction=0.05,
      sample_rate=16000,            # audio
      quantization="mulaw",         # audio: "mulaw" or "linear"
      bits=8,                       # audio quantization bits
      num_workers=0,                # grain worker processes (0: in-process)
      task="lm",                    # "lm" (next token) or "classify" (audio, labels = folder names)
      read_threads=4,               # threads per process (or worker) reading/decoding items
  ))

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=2e-3,
      ssm_learning_rate=1e-3,       # Lambda, log_step and B: own rate, no weight decay (paper)
      weight_decay=0.05,
      b1=0.9,
      b2=0.999,
      warmup_steps=100,
      schedule="cosine",            # "cosine" or "constant" (after warmup)
      min_lr_ratio=0.0,
      clip_norm=1.0,                # global-norm clipping; 0 disables
      grad_accum_steps=1,
  ))

  c.train = ml_collections.ConfigDict(dict(
      num_steps=1000,
      seed=0,
      log_every_steps=10,
      max_bad_steps=10,             # consecutive non-finite updates before exit 2
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, model=1,     # per-slice (ICI) sizes; -1 fills the rest
      dcn_data=1, dcn_fsdp=1, dcn_model=1,  # across slices (DCN)
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=200,
      keep=3,
      keep_every=0,                 # 0: none kept permanently
      init_from="",                 # workdir or checkpoint dir: load params only (fine-tuning)
      async_save=True,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      every_steps=500,              # inline eval during training; 0 disables
      max_batches=0,                # 0: the full held-out split
      batch_size=0,                 # 0: data.batch_size
      seq_len=0,                    # 0: data.seq_len; longer rows give the LM more context
      step_rescale=1.0,             # evaluate at another sample rate with no retraining
      compressor_baselines=True,    # LM: also report xz -9e / gzip -9 on the same held-out bytes
  ))

  c.generate = ml_collections.ConfigDict(dict(
      num_samples=2,
      length=16000,
      temperature=1.0,
      top_p=1.0,
      prompt="",                    # audio file path or text prefix
      seed=0,
  ))
  return c
