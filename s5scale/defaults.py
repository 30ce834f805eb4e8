"""Every config key s5scale knows: its default and, beside it, what values it allows.

Experiment files in configs/ start from `base_config()` and change what they need. Keeping all keys
here means an unknown `--config.x.y` override is caught (ml_collections configs are locked), and the
error can list the valid keys. config_check.py checks a resolved config against CONSTRAINTS
and RULES before anything is compiled or read; a violation exits 2 naming the key.

Adding a key is one line in its section: `name=f(default, Int(ge=1)),  # what it is` (f is
config_schema.field; constraints: Int, Real, OneOf, Bool, Text, Check). A rule that ties keys
together is one `Rule((keys...), lambda *values: ..., "what must hold")` in RULES. A key declared
without a constraint fails at import; tests/test_config_validation.py then asks for a value that
the new constraint must refuse (BAD_VALUES).

A choice that names a code path (`OneOf(*NORMS)`) is read from choices.py, which the code that
implements it keys its tables by; this module imports no JAX, so checking a config takes none.
"""

from s5scale.choices import (ACTIVATIONS, C_INITS, DISCRETIZATIONS, LAYERS, NORMS, QUANTIZATIONS,
                             REMAT_POLICIES, S4D_INITS, SCAN_IMPLS)
from s5scale.config_schema import Bool, Int, OneOf, Real, Rule, Text, build_config, constraints_of
from s5scale.config_schema import field as f

Count = Int(ge=1)          # steps, sizes, counts: at least one
NonNegative = Int(ge=0)    # 0 means "off" or "use the default" (said beside the key)
MeshSize = Int(ge=1, also=(-1,))  # -1 fills the rest of the devices
Seed = Int(ge=0)

MODEL = dict(
    task=f("lm", OneOf("lm", "classify")),          # next-token or classification
    layer=f("s5", OneOf(*LAYERS)),                  # MIMO S5 (P states) or S4D (H SISO SSMs)
    s4d_state_size=f(64, Int(ge=2)),                # S4D: N per channel (even), the S4 papers' 64
    s4d_init=f("legs", OneOf(*S4D_INITS)),          # S4D: HiPPO-N eigenvalues (as S5) or S4D-Lin
    input_kind=f("tokens", OneOf("tokens", "continuous")),  # embedding or linear encoder
    vocab_size=f(260, Count),                       # tokens; at least the data's (bytes: 260)
    num_classes=f(0, NonNegative),                    # classify: 0 = the label folders in data.source
    num_layers=f(4, Count),
    d_model=f(128, Count),                          # H
    ssm_size=f(128, Count),                         # P (P/2 complex states with conj_sym); S5
    blocks=f(4, Count),                             # J; S5
    conj_sym=f(True, Bool()),
    bidirectional=f(False, Bool()),
    discretization=f("zoh", OneOf(*DISCRETIZATIONS)),
    c_init=f("trunc_standard_normal", OneOf(*C_INITS)),
    dt_min=f(1e-3, Real(gt=0)),
    dt_max=f(1e-1, Real(gt=0)),
    clip_eigs=f(False, Bool()),
    step_rescale=f(1.0, Real(gt=0)),
    scan_impl=f("auto", OneOf(*SCAN_IMPLS)),        # auto: Pallas on TPU, chunked elsewhere
    norm=f("layer", OneOf(*NORMS)),
    prenorm=f(True, Bool()),
    activation=f("half_glu1", OneOf(*ACTIVATIONS)),
    mlp_ratio=f(0, NonNegative),                      # 0: no MLP after the SSM
    dropout=f(0.0, Real(ge=0, lt=1)),
    pooling=f("mean", OneOf("mean", "last")),       # classify
    compute_dtype=f("float32", OneOf("float32", "bfloat16")),  # matmuls, S5's B̄/C̃ included
                                                    # (f32 accumulation); parameters, state f32
    scan_layers=f(True, Bool()),                    # nn.scan over depth: compile time flat
    remat=f("none", OneOf(*REMAT_POLICIES)),        # per layer; offload: block
                                                    # inputs saved in host memory (TPU)
    residual_dtype=f("float32", OneOf("float32", "bfloat16")),  # the stream between blocks
)

DATA = dict(
    kind=f("text", OneOf("text", "audio")),
    source=f("", Text()),                           # "" = embedded corpus; file, dir, glob, shards
    mixture=f("", Text()),                          # "" = data.source alone; "[name=]src:w,..."
    text_extensions=f("", Text()),                  # text dir: "" = every non-hidden file; ".py,.md"
    jsonl_field=f("text", Text(nonempty=True)),     # .jsonl key (Parquet column) of each document
    tokenizer=f("bytes", Text(nonempty=True)),      # text: "bytes" or a SentencePiece .model path
    batch_size=f(8, Count),                         # global, across all processes
    seq_len=f(256, Count),
    seed=f(0, Seed),
    heldout_fraction=f(0.05, Real(ge=0, lt=1)),     # share of data.source held out, by hash
    heldout_source=f("", Text()),                   # "" = that hash split; else held-out data
                                                    # as data.source takes it, read whole, and
                                                    # train reads all of data.source: one named
                                                    # held-out set, no hash share withheld
    sample_rate=f(16000, Count),                    # audio
    quantization=f("mulaw", OneOf(*QUANTIZATIONS)),  # audio codes: mu-law or linear
    bits=f(8, Int(ge=1, le=16)),                    # audio quantization bits (vocab 2**bits)
    long_audio_seconds=f(30.0, Real(ge=0)),         # files this long: crops seek; 0 = never
    bandlimit_prob=f(0.0, Real(ge=0, le=1)),        # classify: share of training clips band-limited
    bandlimit_hz=f(0.0, Real(ge=0)),                # ... at this cutoff; >= Nyquist: no-op
    num_workers=f(0, NonNegative),                    # grain worker processes (0: in-process)
    task=f("lm", OneOf("lm", "classify")),          # classify: labels are folder names
    read_threads=f(4, Count),                       # per process (or worker), reading/decoding
    carry_state=f(False, Bool()),                   # LM train: each row streams whole items
                                                    # (recordings, documents) window after
                                                    # window; the model carries its state
)

OPTIM = dict(
    learning_rate=f(2e-3, Real(ge=0)),
    ssm_learning_rate=f(1e-3, Real(ge=0)),          # Lambda, log_step, B: own rate, no decay
    weight_decay=f(0.05, Real(ge=0)),
    b1=f(0.9, Real(ge=0, lt=1)),
    b2=f(0.999, Real(ge=0, lt=1)),
    warmup_steps=f(100, NonNegative),
    schedule=f("cosine", OneOf("cosine", "constant")),  # after warmup
    min_lr_ratio=f(0.0, Real(ge=0, le=1)),
    clip_norm=f(1.0, Real(ge=0)),                   # global-norm clipping; 0 disables
    grad_accum_steps=f(1, Count),
)

TRAIN = dict(
    num_steps=f(1000, Count),
    seed=f(0, Seed),
    log_every_steps=f(10, Count),
    max_bad_steps=f(10, Count),                     # consecutive non-finite updates before exit 2
)

MESH = dict(                                        # per-slice (ICI) sizes; -1 fills the rest
    data=f(-1, MeshSize), fsdp=f(1, MeshSize), model=f(1, MeshSize),
    context=f(1, MeshSize),                         # time split in this many segments
    dcn_data=f(1, MeshSize), dcn_fsdp=f(1, MeshSize), dcn_model=f(1, MeshSize),  # across slices
    dcn_context=f(1, MeshSize),
)

CHECKPOINT = dict(
    every_steps=f(200, Count),
    every_minutes=f(0.0, Real(ge=0)),               # also save this long after the last save;
                                                    # 0: steps only
    keep=f(3, Count),                               # newest steps kept (an eval job may pin more)
    keep_every=f(0, NonNegative),                     # 0: none kept permanently
    init_from=f("", Text()),                        # workdir or checkpoint dir: params only
    async_save=f(True, Bool()),
)

EVAL = dict(
    every_steps=f(500, NonNegative),                  # inline eval during training; 0 disables
    max_batches=f(0, NonNegative),                    # 0: the full held-out split
    batch_size=f(0, NonNegative),                     # 0: data.batch_size
    seq_len=f(0, NonNegative),                        # 0: data.seq_len; longer gives more context
    step_rescale=f(1.0, Real(gt=0)),                # another sample rate, no retraining
    compressor_baselines=f(True, Bool()),           # LM: also xz -9e / gzip -9 on held-out bytes
    recompute_batch_stats=f(0, NonNegative),          # N > 0 (norm="batch"): BatchNorm statistics
                                                    # from N training batches first; 0: as saved
    lowpass_hz=f(0.0, Real(ge=0)),                  # classify: band-limit held-out clips; 0: off
    carry_state=f(False, Bool()),                   # LM: also score whole held-out items as
                                                    # windows with the state carried across them
)

GENERATE = dict(
    num_samples=f(2, Count),
    length=f(16000, Count),
    temperature=f(1.0, Real(ge=0)),                 # 0: greedy
    top_p=f(1.0, Real(gt=0, le=1)),
    prompt=f("", Text()),                           # audio file path or text prefix
    seed=f(0, Seed),
)

SECTIONS = dict(model=MODEL, data=DATA, optim=OPTIM, train=TRAIN, mesh=MESH,
                checkpoint=CHECKPOINT, eval=EVAL, generate=GENERATE)
CONSTRAINTS = constraints_of(SECTIONS)


def mesh_ways(*sizes: int) -> int:
  """Devices along these mesh axes as far as the config alone says: -1 counts as 1 here; the
  entry points check again once the devices fill it in."""
  ways = 1
  for size in sizes:
    ways *= max(size, 1)
  return ways


def data_vocab(kind: str, tokenizer: str, bits: int) -> int:
  """Token ids the data can produce, when the config alone decides it (0: a SentencePiece file
  decides, checked when it is read)."""
  if kind == "audio":
    return 2**bits
  return 260 if tokenizer == "bytes" else 0  # 256 bytes + PAD, BOS, EOS, one reserved


def mixture_error(mixture: str) -> str:
  """Why data.mixture cannot be parsed ("" when it can). Imports the data package only when a
  mixture is set, so validating an ordinary config stays light."""
  if not mixture:
    return ""
  from s5scale.data import mixture as mixture_lib  # pylint: disable=g-import-not-at-top
  try:
    mixture_lib.parse(mixture)
  except ValueError as error:
    return str(error)
  return ""


RULES = [
    Rule(("data.mixture",), lambda mixture: not mixture_error(mixture),
         "[name=]source:weight entries, at least two, positive weights, distinct names"),
    Rule(("data.mixture", "data.source", "data.task"),
         lambda mixture, source, task: not mixture or (not source and task == "lm"),
         "data.source='' and data.task='lm' when data.mixture is set"),
    Rule(("data.mixture", "data.heldout_source"),
         lambda mixture, heldout: not (mixture and heldout),
         "data.heldout_source='' when data.mixture is set (each source is split by hash)"),
    Rule(("data.kind", "data.task"), lambda kind, task: task == "lm" or kind == "audio",
         "data.task='lm' for text (classification needs audio folders)"),
    Rule(("model.dt_min", "model.dt_max"), lambda lo, hi: lo < hi,
         "model.dt_min < model.dt_max"),
    Rule(("model.layer", "model.ssm_size", "model.blocks"),
         lambda layer, p, j: layer != "s5" or p % j == 0,
         "model.ssm_size divisible by model.blocks (S5)"),
    Rule(("model.layer", "model.ssm_size", "model.blocks", "model.conj_sym"),
         lambda layer, p, j, conj: layer != "s5" or not conj or (p // j) % 2 == 0,
         "model.ssm_size / model.blocks even with model.conj_sym (S5: conjugate pairs per block)"),
    Rule(("model.layer", "model.s4d_state_size"), lambda layer, n: layer != "s4d" or n % 2 == 0,
         "model.s4d_state_size even (S4D keeps N/2 conjugate pairs once)"),
    Rule(("model.layer", "model.discretization"),
         lambda layer, method: layer != "s4d" or method == "zoh",
         "model.discretization='zoh' with model.layer='s4d' (S4D is defined with ZOH)"),
    Rule(("data.task", "model.task"), lambda d, m: d == m, "data.task == model.task"),
    Rule(("model.input_kind", "model.vocab_size", "data.kind", "data.tokenizer", "data.bits"),
         lambda kind, vocab, data_kind, tokenizer, bits:
         kind != "tokens" or vocab >= data_vocab(data_kind, tokenizer, bits),
         "model.vocab_size >= the data's token count (260 for bytes, 2**data.bits for audio)"),
    Rule(("optim.warmup_steps", "train.num_steps"), lambda warmup, steps: warmup <= steps,
         "optim.warmup_steps <= train.num_steps"),
    Rule(("checkpoint.keep_every", "checkpoint.every_steps"),
         lambda every_k, every: every_k % every == 0,
         "checkpoint.keep_every a multiple of checkpoint.every_steps (or 0)"),
    Rule(("data.batch_size", "optim.grad_accum_steps", "mesh.data", "mesh.fsdp", "mesh.dcn_data",
          "mesh.dcn_fsdp"),
         lambda batch, accum, *axes: batch % (accum * mesh_ways(*axes)) == 0,
         "data.batch_size divisible by optim.grad_accum_steps x mesh data*fsdp (ICI x DCN)"),
    Rule(("model.d_model", "mesh.model", "mesh.dcn_model"),
         lambda h, *axes: h % mesh_ways(*axes) == 0,
         "model.d_model divisible by mesh.model (ICI x DCN)"),
    Rule(("model.d_model", "mesh.fsdp", "mesh.dcn_fsdp"),
         lambda h, *axes: h % mesh_ways(*axes) == 0,
         "model.d_model divisible by mesh.fsdp (ICI x DCN)"),
    Rule(("model.layer", "model.ssm_size", "model.conj_sym", "mesh.model", "mesh.dcn_model"),
         lambda layer, p, conj, *axes:
         layer != "s5" or (p // 2 if conj else p) % mesh_ways(*axes) == 0,
         "model.ssm_size's complex states (P/2 with conj_sym) divisible by mesh.model"),
    Rule(("data.bandlimit_prob", "data.bandlimit_hz", "data.task"),
         lambda prob, cutoff, task: prob == 0 or (task == "classify" and cutoff > 0),
         "data.bandlimit_prob 0, or (data.task=classify) with data.bandlimit_hz > 0"),
    Rule(("data.carry_state", "model.bidirectional"), lambda carry, both: not (carry and both),
         "model.bidirectional=False with data.carry_state=True (a backward pass would need the "
         "windows still to come)"),
    Rule(("data.carry_state", "model.task"), lambda carry, task: not carry or task == "lm",
         "model.task='lm' with data.carry_state=True (a classifier reads one clip per example)"),
    Rule(("eval.lowpass_hz", "data.sample_rate", "model.task"),
         lambda cutoff, rate, task: cutoff == 0 or (task == "classify" and 2 * cutoff < rate),
         "eval.lowpass_hz 0, or (model.task=classify) with 2 x eval.lowpass_hz < data.sample_rate"),
    Rule(("eval.carry_state", "model.task", "model.bidirectional"),
         lambda carry, task, bidirectional: not carry or (task == "lm" and not bidirectional),
         "eval.carry_state only for a causal LM (model.task='lm', model.bidirectional=False)"),
]


def base_config():
  return build_config(SECTIONS)
