"""Benchmarks that measure what they compare within one run, and print JSON lines.

  python tools/bench.py layer       # S5 layer fwd+bwd: default vs reference vs roofline
  python tools/bench.py s4d         # S5 vs S4D (FFT conv, and recurrence) fwd+bwd over lengths
  python tools/bench.py train       # training-step MFU vs a GEMM peak measured alongside
  python tools/bench.py calibrate   # AOT cost model's bounds vs the measured CPU train step
  python tools/bench.py carry       # train step with data.carry_state vs without
                                    # (also: compile, data, checkpoint, generate)

Each subcommand is one function, registered in SUBCOMMANDS (the system ones live in
bench_system.py, shared timing helpers in benchlib.py). Timings are medians over interleaved
rounds, so a machine shared with other jobs slows every item alike.
"""

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import bench_calibrate
import bench_s4d
import bench_system  # also puts the repository on sys.path, through benchlib
from benchlib import emit, interleaved_times, summary, temp_bytes
from s5scale import hardware  # pylint: disable=g-import-not-at-top,wrong-import-position
from s5scale.nn import s5  # pylint: disable=g-import-not-at-top,wrong-import-position


# ----------------------------------------------------------------------------- helpers

class CpuClock:
  """Wraps a benchmarked function and records the process CPU seconds (all threads) of each call.

  Reported beside wall time: on a shared machine, CPU seconds show how much of a slow wall time
  was waiting for a core.
  """

  def __init__(self, fn):
    self.fn, self.seconds = fn, []

  def __call__(self, *args):
    start = time.process_time()
    result = jax.block_until_ready(self.fn(*args))
    self.seconds.append(time.process_time() - start)
    return result


# ----------------------------------------------------------------------------- layer

def bench_layer(args) -> dict:
  """S5 layer forward+backward: the default scan_impl ("auto") vs reference, against a roofline
  measured alongside.

  Roofline = the layer's projection GEMMs alone (u @ B̄ and x @ C̃ as real GEMMs, forward and
  backward: 3x the forward GEMM FLOPs), plus one read and one write of the (batch, L, P'') complex64
  state tensor at the streaming bandwidth of an in-place elementwise op over as many bytes, timed
  in the same rounds.
  """
  key_u, key_params, key_gemm = jax.random.split(jax.random.PRNGKey(args.seed), 3)
  u = jax.random.normal(key_u, (args.batch, args.length, args.d_model), jnp.float32)

  def layer_grad(impl):
    layer = s5.S5(d_model=args.d_model, ssm_size=args.ssm_size, blocks=args.blocks,
                  conj_sym=args.conj_sym, bidirectional=args.bidirectional, scan_impl=impl)
    params = layer.init(key_params, u[:, :8])
    loss = lambda p, x: jnp.sum(layer.apply(p, x))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (params, u)

  num_states = args.ssm_size // 2 if args.conj_sym else args.ssm_size
  state_width = num_states * (2 if args.bidirectional else 1)  # P''
  rows = args.batch * args.length
  w_in = jax.random.normal(key_gemm, (args.d_model, 2 * num_states), jnp.float32) * 0.05
  w_out = jax.random.normal(key_gemm, (2 * state_width, args.d_model), jnp.float32) * 0.05

  def gemms(w_in, w_out, x):
    """The layer's two projections, with the scan between them left out."""
    states = x.reshape(rows, -1) @ w_in
    # Bidirectional reads both directions' states: two GEMMs of the one state width each.
    outputs = [states @ w_out[i * 2 * num_states:(i + 1) * 2 * num_states]
               for i in range(w_out.shape[0] // (2 * num_states))]
    return jnp.sum(sum(outputs))

  gemm_grad = jax.jit(jax.value_and_grad(gemms, argnums=(0, 1, 2)))
  gemm_flops = 3 * 2 * rows * (args.d_model * 2 * num_states + 2 * state_width * args.d_model)

  state_bytes = rows * state_width * jnp.dtype(jnp.complex64).itemsize

  items = {"default": layer_grad("auto"), "reference": layer_grad("reference"),
           "gemm": (gemm_grad, (w_in, w_out, u)), "stream": (hardware.InPlaceStream(state_bytes), ())}
  memory = {name: temp_bytes(fn, *fn_args) for name, (fn, fn_args) in items.items()
            if name in ("default", "reference")}
  clocks = {name: CpuClock(fn) for name, (fn, _) in items.items()}
  times = interleaved_times({name: (clocks[name], fn_args) for name, (_, fn_args) in items.items()},
                            args.repeats, args.warmup)
  median = {name: statistics.median(t) for name, t in times.items()}

  def timing(name):
    return {**summary(times[name]),
            "cpu_median_s": statistics.median(clocks[name].seconds[args.warmup:])}

  shape = {"batch": args.batch, "length": args.length, "d_model": args.d_model,
           "ssm_size": args.ssm_size, "num_states": num_states, "conj_sym": args.conj_sym,
           "bidirectional": args.bidirectional}
  for name in ("default", "reference"):
    emit({"bench": "layer", "item": name, **shape, **timing(name),
          "temp_bytes": memory[name]})
  emit({"bench": "layer", "item": "gemm", **timing("gemm"),
        "flops": gemm_flops, "gflops_per_s": gemm_flops / median["gemm"] / 1e9})
  bandwidth = 2 * state_bytes / median["stream"]
  emit({"bench": "layer", "item": "stream", **timing("stream"),
        "bytes_moved": 2 * state_bytes, "gb_per_s": bandwidth / 1e9})
  roofline = median["gemm"] + 2 * state_bytes / bandwidth
  result = {
      "bench": "layer", "item": "summary", **shape,
      "default_s": median["default"], "reference_s": median["reference"], "roofline_s": roofline,
      "speedup": median["reference"] / median["default"],
      "memory_ratio": memory["default"] / memory["reference"],
      "default_over_roofline": median["default"] / roofline,
  }
  result["meets_targets"] = {"speedup>=2.5": result["speedup"] >= 2.5,
                             "memory_ratio<=1/3": result["memory_ratio"] <= 1 / 3,
                             "default_over_roofline<=1.5": result["default_over_roofline"] <= 1.5}
  emit(result)
  return result


def add_layer_flags(parser):
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=16384)
  parser.add_argument("--d-model", type=int, default=128, help="H")
  parser.add_argument("--ssm-size", type=int, default=256, help="P (P' = P/2 with conj_sym)")
  parser.add_argument("--blocks", type=int, default=1)
  parser.add_argument("--conj-sym", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--bidirectional", action="store_true")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls per item first")
  parser.add_argument("--seed", type=int, default=0)


# ----------------------------------------------------------------------------- main

# name -> (function(args), function adding its flags to a parser, one-line help)
SUBCOMMANDS = {
    "layer": (bench_layer, add_layer_flags, "S5 layer fwd+bwd: default vs reference vs roofline"),
    "s4d": (bench_s4d.bench_s4d, bench_s4d.add_s4d_flags,
            "S5 vs S4D (FFT conv, and recurrence) fwd+bwd time and memory over lengths"),
    "calibrate": (bench_calibrate.bench_calibrate, bench_calibrate.add_flags,
                  "AOT cost model's serial bound vs the measured train step, on this CPU"),
    **{name: (fn, lambda parser, name=name: bench_system.add_flags(parser, name), help_text)
       for name, (fn, help_text) in bench_system.SYSTEM_SUBCOMMANDS.items()},
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  subparsers = parser.add_subparsers(dest="command", required=True)
  for name, (_, add_flags, help_text) in SUBCOMMANDS.items():
    add_flags(subparsers.add_parser(name, help=help_text))
  args = parser.parse_args(argv)
  for flag in ("batch", "length", "d_model", "ssm_size", "repeats"):
    if getattr(args, flag, 1) < 1:
      parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
  try:
    SUBCOMMANDS[args.command][0](args)
  except ValueError as error:  # a bad flag combination, named by the code that rejects it
    parser.exit(2, f"bench {args.command}: {error}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
