"""Timing helpers shared by tools/bench.py's subcommands.

Timings are medians over interleaved rounds (the compared items run in turn, round after round),
so a machine shared with other jobs slows every item alike.
"""

import json
import os
import statistics
import sys
import time

import jax

# Benchmarks run as scripts from tools/: make the repo importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
