"""Benchmarks that measure what they compare within one run, and print JSON lines.

  python tools/bench.py layer                 # S5 layer fwd+bwd: default vs reference vs roofline

Each subcommand is one function below, registered in SUBCOMMANDS. Timings are medians over
interleaved rounds (the compared items run in turn, round after round), so a machine shared with
other jobs slows every item alike rather than whichever ran during a busy spell.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from s5scale.nn import s5  # pylint: disable=g-import-not-at-top,wrong-import-position


# ----------------------------------------------------------------------------- shared helpers

def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def timed_call(fn, *args) -> float:
  """Seconds for one call, waiting for every output."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def interleaved_times(items: dict, repeats: int, warmup: int = 1) -> dict:
  """{name: [seconds per call]} for items {name: (jitted fn, args)}, run round-robin.

  Warm-up calls (compilation, first-touch of buffers) are run and dropped.
  """
  for fn, args in items.values():
    for _ in range(warmup):
      timed_call(fn, *args)
  times = {name: [] for name in items}
  for _ in range(repeats):
    for name, (fn, args) in items.items():
      times[name].append(timed_call(fn, *args))
  return times


def temp_bytes(jitted, *args) -> int:
  """Peak temporary memory XLA plans for one call (arguments and outputs excluded)."""
  return int(jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def summary(times: list) -> dict:
  return {"median_s": statistics.median(times), "min_s": min(times),
          "times_s": [round(t, 4) for t in times]}


# ----------------------------------------------------------------------------- layer

def bench_layer(args) -> dict:
  """S5 layer forward+backward: default vs reference, against a roofline measured alongside.

  Roofline = the layer's projection GEMMs alone (u @ B̄ and x @ C̃ as real GEMMs, forward and
  backward: 3x the forward GEMM FLOPs), plus one read and one write of the (batch, L, P'') complex64
  state tensor at the streaming bandwidth of a large elementwise op timed in the same rounds.
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
  stream_input = jnp.ones((state_bytes // 4,), jnp.float32)
  stream = jax.jit(lambda x: x * 1.5 + 1.0)  # reads and writes state_bytes

  items = {"default": layer_grad("default"), "reference": layer_grad("reference"),
           "gemm": (gemm_grad, (w_in, w_out, u)), "stream": (stream, (stream_input,))}
  memory = {name: temp_bytes(fn, *fn_args) for name, (fn, fn_args) in items.items()
            if name in ("default", "reference")}
  times = interleaved_times(items, args.repeats, args.warmup)
  median = {name: statistics.median(t) for name, t in times.items()}

  shape = {"batch": args.batch, "length": args.length, "d_model": args.d_model,
           "ssm_size": args.ssm_size, "num_states": num_states, "conj_sym": args.conj_sym,
           "bidirectional": args.bidirectional}
  for name in ("default", "reference"):
    emit({"bench": "layer", "item": name, **shape, **summary(times[name]),
          "temp_bytes": memory[name]})
  emit({"bench": "layer", "item": "gemm", **summary(times["gemm"]), "flops": gemm_flops,
        "gflops_per_s": gemm_flops / median["gemm"] / 1e9})
  bandwidth = 2 * state_bytes / median["stream"]
  emit({"bench": "layer", "item": "stream", **summary(times["stream"]),
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
  SUBCOMMANDS[args.command][0](args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
