"""System benchmarks for tools/bench.py: compile, data, checkpoint, generate, train.

Each measures the compared quantities within one run and prints one JSON line.
"""

import os
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchlib import emit, interleaved_times, summary, timed_call
from s5scale import checkpoint, data, metrics, parallel, steps
from s5scale import training
from s5scale.nn.model import S5Model
from s5scale.sampling import make_sampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, **overrides):
  import runpy
  config = runpy.run_path(os.path.join(REPO, "configs", f"{name}.py"))["get_config"]()
  for key, value in overrides.items():
    section, field = key.split("__")
    config[section][field] = value
  return config


def _flat(config) -> dict:
  return {f"{section}.{key}": value for section, fields in config.items()
          for key, value in fields.items()}


def build_step(config, mesh=None):
  """Compiled train step, a fresh sharded state and a real batch, with the compile time."""
  mesh = mesh or parallel.make_mesh(config.mesh, jax.devices()[:1])
  iterator = data.make_iterator(config.data, "train")
  batch = next(iterator)
  model, optimizer, schedule, abstract_state, shardings = training.build_model_and_state(
      config, mesh, batch)
  start = time.perf_counter()
  compiled = training.jit_train_step(config, mesh, model, optimizer, schedule, shardings).lower(
      abstract_state, training.abstract_batch(batch, mesh)).compile()
  compile_s = time.perf_counter() - start
  state = jax.jit(lambda: nn.unbox(steps.init_train_state(model, optimizer, config, batch)),
                  out_shardings=shardings)()
  return dict(compiled=compiled, state=state, batch=parallel.global_batch(batch, mesh),
              iterator=iterator, mesh=mesh, model=model, compile_s=compile_s)


def median_step_seconds(built, repeats: int) -> tuple[float, object]:
  state, times = built["state"], []
  for _ in range(repeats + 1):
    start = time.perf_counter()
    state, step_metrics = built["compiled"](state, built["batch"])
    jax.block_until_ready(step_metrics)
    times.append(time.perf_counter() - start)
  built["state"] = state
  return float(np.median(times[1:])), state


# ----------------------------------------------------------------------------- compile

def bench_compile(args) -> dict:
  """Train-step compile time at 48 layers vs 4: nn.scan keeps it flat in depth."""
  seconds = {}
  for layers in (args.shallow, args.deep):
    config = load_config(args.config, model__num_layers=layers)
    seconds[layers] = build_step(config)["compile_s"]
  result = {"bench": "compile", "config": args.config,
            f"compile_s_{args.shallow}_layers": seconds[args.shallow],
            f"compile_s_{args.deep}_layers": seconds[args.deep],
            "ratio": seconds[args.deep] / seconds[args.shallow]}
  result["target_ratio<=1.5"] = result["ratio"] <= 1.5
  emit(result)
  return result


# ----------------------------------------------------------------------------- data

def bench_data(args) -> dict:
  """Pipeline examples/s against what the training step consumes, per config."""
  results = {"bench": "data"}
  for name in args.configs:
    config = load_config(name)
    iterator = data.make_iterator(config.data, "train")
    next(iterator)
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
      next(iterator)
      count += 1
    pipeline_examples_s = count * config.data.batch_size / (time.perf_counter() - start)
    step_s, _ = median_step_seconds(build_step(config), args.repeats)
    consumed_examples_s = config.data.batch_size / step_s
    results[name] = {"pipeline_examples_per_s": pipeline_examples_s,
                     "train_examples_per_s": consumed_examples_s,
                     "headroom": pipeline_examples_s / consumed_examples_s,
                     "target_headroom>=10": pipeline_examples_s / consumed_examples_s >= 10}
  if args.long_minutes > 0:
    results["long_audio"] = _long_audio_crops(args.long_minutes, args.seconds)
  emit(results)
  return results


def _long_audio_crops(minutes: float, seconds: float) -> dict:
  """Train crops/s from 64 `minutes`-long FLACs (seeked) vs from 64 one-second FLACs (decoded
  whole), one read thread each, measured in alternating rounds.

  The 64 long files are hard links to one FLAC (writing 64 ten-minute files would take minutes).
  Both sets have 64 items because grain's per-epoch shuffle costs tens of ms, which a set of
  two files would pay on every other crop: that would be measured instead of the decoding."""
  import soundfile  # pylint: disable=g-import-not-at-top
  from s5scale import defaults  # pylint: disable=g-import-not-at-top
  rate, rng = 16000, np.random.default_rng(0)

  def write(path, num_seconds):
    time_s = np.arange(int(num_seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * (220 + 30 * np.sin(0.1 * time_s)) * time_s)
    soundfile.write(path, tone + 0.05 * rng.standard_normal(time_s.size), rate, format="FLAC")

  with tempfile.TemporaryDirectory() as root:
    for kind, length_s in (("long", 60 * minutes), ("short", 1.0)):
      os.makedirs(os.path.join(root, kind))
      for i in range(64):
        if kind == "short" or i == 0:
          write(os.path.join(root, kind, f"{i}.flac"), length_s)
        else:
          os.link(os.path.join(root, kind, "0.flac"), os.path.join(root, kind, f"{i}.flac"))
    iterators = {}
    for kind in ("long", "short"):
      config = defaults.base_config().data
      config.update(kind="audio", source=os.path.join(root, kind), batch_size=8, seq_len=4000,
                    heldout_fraction=0.0, num_workers=0, read_threads=1)
      iterators[kind] = data.make_iterator(config, "train")
      next(iterators[kind])
    crops, elapsed = {"long": 0, "short": 0}, {"long": 0.0, "short": 0.0}
    for _ in range(3):
      for kind, iterator in iterators.items():
        start = time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
          crops[kind] += len(next(iterator)["inputs"])
        elapsed[kind] += time.perf_counter() - start
  rates = {kind: crops[kind] / elapsed[kind] for kind in crops}
  return {f"crops_per_s_{minutes:g}min_files": rates["long"], "crops_per_s_1s_files":
          rates["short"], "ratio_short/long": rates["short"] / rates["long"],
          "target_ratio<=2": rates["short"] / rates["long"] <= 2}


# ----------------------------------------------------------------------------- checkpoint

def bench_checkpoint(args) -> dict:
  """Time the loop is blocked per async save, as a fraction of a training step."""
  config = load_config(args.config)
  built = build_step(config)
  step_s, state = median_step_seconds(built, args.repeats)
  blocked = []
  with tempfile.TemporaryDirectory() as workdir:
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    saver = checkpoint.Saver(manager)
    for step in range(1, args.saves + 1):
      state, step_metrics = built["compiled"](state, built["batch"])
      jax.block_until_ready(step_metrics)
      start = time.perf_counter()  # what the training loop waits for: the save call itself
      saver.save(step, state, built["iterator"], config.to_dict(), built["mesh"])
      blocked.append(time.perf_counter() - start)
      saver.wait_until_finished()  # the next save would otherwise wait for this one
    manager.close()
  blocked_s = float(np.median(blocked))
  result = {"bench": "checkpoint", "config": args.config, "step_s": step_s,
            "blocked_per_save_s": blocked_s, "blocked_fraction_of_step": blocked_s / step_s,
            "target_fraction<=0.1": blocked_s / step_s <= 0.1, "blocked_all_s": blocked}
  emit(result)
  return result


# ----------------------------------------------------------------------------- generate

def bench_generate(args) -> dict:
  """Recurrent sampling rate vs recomputing the parallel model over a growing prefix."""
  config = load_config(args.config)
  model = S5Model.from_config(config.model)
  prompt = np.zeros((1, 1), np.int32)
  variables = model.init(jax.random.PRNGKey(0), prompt)
  sampler = make_sampler(model, args.length, temperature=1.0, top_p=1.0)
  context = np.zeros((1, args.context), np.int32)
  parallel_forward = jax.jit(lambda v, x: model.apply(v, x)[:, -1])
  times = interleaved_times({"sample": (sampler, (variables, prompt, 0)),
                             "parallel": (parallel_forward, (variables, context))},
                            repeats=args.repeats)
  per_sample_s = float(np.median(times["sample"])) / args.length
  parallel_s = float(np.median(times["parallel"]))
  result = {"bench": "generate", "config": args.config, "samples_per_s": 1 / per_sample_s,
            "recurrent_s_per_sample": per_sample_s,
            f"parallel_recompute_s_per_sample_at_{args.context}": parallel_s,
            "speedup": parallel_s / per_sample_s, "target_speedup>=100": parallel_s / per_sample_s
            >= 100, "sample": summary(times["sample"]), "parallel": summary(times["parallel"])}
  emit(result)
  return result


# ----------------------------------------------------------------------------- train

def bench_train(args) -> dict:
  """Training-step model FLOPs utilisation against a GEMM peak measured in the same run.

  FLOPs are the compiled step's matmuls with loops counted by trip count (metrics.compiled_flops).
  """
  overrides = dict(item.split("=", 1) for item in args.set)
  config = load_config(args.config, **{k.replace(".", "__"): type(v)(overrides[k]) for k, v in
                                       _flat(load_config(args.config)).items() if k in overrides})
  built = build_step(config)
  flops = metrics.compiled_flops(built["compiled"])
  step_s, _ = median_step_seconds(built, args.repeats)
  size = args.gemm_size
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  gemm_s = min(timed_call(matmul, a) for _ in range(args.repeats + 1))
  peak = 2 * size ** 3 / gemm_s
  result = {"bench": "train", "config": args.config, "overrides": overrides, "step_s": step_s,
            "step_gflop": flops / 1e9, "achieved_gflop_per_s": flops / step_s / 1e9,
            "gemm_peak_gflop_per_s": peak / 1e9, "mfu": flops / step_s / peak,
            "target_mfu>=0.35": flops / step_s / peak >= 0.35,
            "tokens_per_s": config.data.batch_size * config.data.seq_len / step_s}
  emit(result)
  return result


# ----------------------------------------------------------------------------- carried state

def bench_carry(args) -> dict:
  """Train step with data.carry_state=True vs the same step without, timed in alternating rounds:
  the carried states (an initial state folded into each scan's first input, a final state kept)
  should cost next to nothing."""
  built = {"fresh": build_step(load_config(args.config)),
           "carried": build_step(load_config(args.config, data__carry_state=True))}
  times = {name: [] for name in built}
  for round_index in range(args.repeats + 1):
    for name, step in built.items():
      start = time.perf_counter()
      step["state"], step_metrics = step["compiled"](step["state"], step["batch"])
      jax.block_until_ready(step_metrics)
      if round_index:   # the first round warms up
        times[name].append(time.perf_counter() - start)
  ratio = float(np.median(times["carried"]) / np.median(times["fresh"]))
  result = {"bench": "carry", "config": args.config, "fresh": summary(times["fresh"]),
            "carried": summary(times["carried"]), "carried_over_fresh": ratio,
            "target_ratio<=1.05": ratio <= 1.05}
  emit(result)
  return result


def add_flags(parser, name: str) -> None:
  parser.add_argument("--repeats", type=int, default=5)
  if name == "compile":
    parser.add_argument("--config", default="text_small")
    parser.add_argument("--shallow", type=int, default=4)
    parser.add_argument("--deep", type=int, default=48)
  elif name == "data":
    parser.add_argument("--configs", nargs="+", default=["audio_small", "text_small"])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--long-minutes", type=float, default=10.0,
                        help="also: crops/s from files this long vs 1 s files (0: skip)")
  elif name == "generate":
    parser.add_argument("--config", default="audio_small")
    parser.add_argument("--length", type=int, default=2000, help="samples drawn per timing")
    parser.add_argument("--context", type=int, default=16000)
  else:
    parser.add_argument("--config", default="audio_small")
    if name == "checkpoint":
      parser.add_argument("--saves", type=int, default=5)
    if name == "train":
      parser.add_argument("--gemm-size", type=int, default=2048)
      parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                          help="config overrides, e.g. model.d_model=256")


SYSTEM_SUBCOMMANDS = {
    "compile": (bench_compile, "train-step compile time, 48 vs 4 layers"),
    "data": (bench_data, "pipeline examples/s vs training consumption"),
    "checkpoint": (bench_checkpoint, "loop time blocked per async save vs step time"),
    "generate": (bench_generate, "recurrent samples/s vs parallel recompute at 16k context"),
    "train": (bench_train, "training-step MFU vs measured GEMM peak"),
    "carry": (bench_carry, "train step with data.carry_state vs without"),
}
