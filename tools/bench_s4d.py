"""`python tools/bench.py s4d`: S5 (its default scan) against S4D (FFT convolution, and the same
S4D on packed documents: chunked, and through the per-step recurrence), forward+backward, over
sequence lengths. The packed items get a document start every --document-length steps.

Per length, each item's peak temporary memory comes from the compiled program
(memory_analysis), and its time from interleaved rounds. An item whose planned temporaries exceed
--max-temp-gib is compiled and reported but not run: S4D's recurrence carries H·N/2 states per
step (4,096 at H=128, N=64, against S5's P/2 = 128), which outgrows a small machine first.
JSON lines go to stdout; a markdown table (docs/benchmarks.md) goes to stderr.
"""

import statistics
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchlib import emit, interleaved_times, temp_bytes
from s5scale import ssm  # pylint: disable=g-import-not-at-top,wrong-import-position
from s5scale.nn import s4d, s5  # pylint: disable=g-import-not-at-top,wrong-import-position

ITEMS = ("s5", "s4d_fft", "s4d_chunked", "s4d_recurrence")


def s4d_system(params):
  return (params["Lambda_re"] + 1j * params["Lambda_im"],
          params["C"][..., 0] + 1j * params["C"][..., 1])


def make_items(args, length: int, key) -> dict:
  """name -> (jitted value_and_grad over (params, u), (params, u))."""
  key_u, key_s5, key_s4d = jax.random.split(key, 3)
  u = jax.random.normal(key_u, (args.batch, length, args.d_model), jnp.float32)
  s5_layer = s5.S5(d_model=args.d_model, ssm_size=args.ssm_size, blocks=args.blocks)
  s5_params = nn.unbox(s5_layer.init(key_s5, u[:, :8]))
  s4d_params = nn.unbox(s4d.S4D(d_model=args.d_model, state_size=args.s4d_state_size).init(
      key_s4d, u[:, :8]))["params"]

  def s5_loss(params, x):
    return jnp.sum(s5_layer.apply(params, x))

  def fft_loss(params, x):
    lambda_, c = s4d_system(params)
    return jnp.sum(ssm.s4d_conv(lambda_, c, params["log_step"], x, bidirectional=False,
                                D=params["D"]))

  reset = (jnp.arange(length) % args.document_length == 0)[None].repeat(args.batch, axis=0)

  def chunked_loss(params, x):
    lambda_, c = s4d_system(params)
    return jnp.sum(ssm.s4d_chunked(lambda_, c, params["log_step"], x, bidirectional=False,
                                   reset=reset, D=params["D"]))

  def recurrence_loss(params, x):
    lambda_, c = s4d_system(params)
    return jnp.sum(ssm.s4d_recurrence(lambda_, c, params["log_step"], x, bidirectional=False,
                                      reset=reset, D=params["D"]))

  def grad(loss):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

  return {"s5": (grad(s5_loss), (s5_params, u)),
          "s4d_fft": (grad(fft_loss), (s4d_params, u)),
          "s4d_chunked": (grad(chunked_loss), (s4d_params, u)),
          "s4d_recurrence": (grad(recurrence_loss), (s4d_params, u))}


def bench_s4d(args) -> list[dict]:
  results = []
  for length in args.lengths:
    items = make_items(args, length, jax.random.PRNGKey(args.seed))
    memory = {name: temp_bytes(fn, *fn_args) for name, (fn, fn_args) in items.items()}
    runnable = {name: item for name, item in items.items()
                if memory[name] <= args.max_temp_gib * 2**30}
    times = interleaved_times(runnable, args.repeats, args.warmup)
    median = {name: statistics.median(t) for name, t in times.items()}
    shape = {"batch": args.batch, "length": length, "d_model": args.d_model,
             "ssm_size": args.ssm_size, "s4d_state_size": args.s4d_state_size}
    for name in ITEMS:
      record = {"bench": "s4d", "item": name, **shape, "temp_bytes": memory[name]}
      if name in median:
        record.update(median_s=median[name], times_s=[round(t, 4) for t in times[name]])
      else:
        record["skipped"] = f"planned temporaries {memory[name] / 2**30:.1f} GiB > --max-temp-gib"
      emit(record)
    summary = {"bench": "s4d", "item": "summary", **shape,
               **{f"{name}_s": median.get(name) for name in ITEMS},
               **{f"{name}_temp_bytes": memory[name] for name in ITEMS},
               "fft_over_s5_time": ratio(median.get("s4d_fft"), median.get("s5")),
               "fft_over_s5_memory": memory["s4d_fft"] / memory["s5"],
               "chunked_over_s5_time": ratio(median.get("s4d_chunked"), median.get("s5")),
               "chunked_over_s5_memory": memory["s4d_chunked"] / memory["s5"],
               "recurrence_over_s5_time": ratio(median.get("s4d_recurrence"), median.get("s5")),
               "recurrence_over_s5_memory": memory["s4d_recurrence"] / memory["s5"]}
    emit(summary)
    results.append(summary)
  emit({"bench": "s4d", "item": "crossover", **crossover(results)})
  print(markdown_table(results), file=sys.stderr)
  return results


def ratio(numerator, denominator):
  return None if numerator is None or denominator is None else numerator / denominator


def crossover(results: list[dict]) -> dict:
  """Which layer is faster at each length, and the consecutive lengths between which that flips."""
  faster = {r["length"]: ("s4d_fft" if r["fft_over_s5_time"] < 1 else "s5")
            for r in results if r["fft_over_s5_time"] is not None}
  lengths = sorted(faster)
  flips = [[a, b] for a, b in zip(lengths, lengths[1:]) if faster[a] != faster[b]]
  return {"faster": {str(k): v for k, v in faster.items()}, "crossover_between": flips}


def markdown_table(results: list[dict]) -> str:
  def seconds(value):
    return "not run" if value is None else f"{value:.3f} s"

  def gib(value):
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"

  lines = ["| L | S5 time | S4D FFT time | S4D chunked time | S4D recurrence time | FFT / S5 time | "
           "S5 temp | S4D FFT temp | S4D chunked temp | S4D recurrence temp |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    time_ratio = "–" if r["fft_over_s5_time"] is None else f"{r['fft_over_s5_time']:.2f}"
    lines.append(f"| {r['length']:,} | {seconds(r['s5_s'])} | {seconds(r['s4d_fft_s'])} | "
                 f"{seconds(r['s4d_chunked_s'])} | {seconds(r['s4d_recurrence_s'])} | "
                 f"{time_ratio} | {gib(r['s5_temp_bytes'])} | {gib(r['s4d_fft_temp_bytes'])} | "
                 f"{gib(r['s4d_chunked_temp_bytes'])} | {gib(r['s4d_recurrence_temp_bytes'])} |")
  return "\n".join(lines)


def add_s4d_flags(parser):
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--d-model", type=int, default=128, help="H")
  parser.add_argument("--ssm-size", type=int, default=256, help="S5's P (P/2 complex states)")
  parser.add_argument("--blocks", type=int, default=1, help="S5's J")
  parser.add_argument("--s4d-state-size", type=int, default=64, help="S4D's N per channel")
  parser.add_argument("--document-length", type=int, default=1000,
                      help="packed items: a document starts every this many steps")
  parser.add_argument("--max-temp-gib", type=float, default=4.0,
                      help="compile but do not run items planning more temporaries than this")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls per item first")
  parser.add_argument("--seed", type=int, default=0)
