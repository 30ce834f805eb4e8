"""bench.py calibrate: the AOT cost model (s5scale/cost_model.py) against a measured train step.

The cost model prices TPU programs nobody here can run. On this machine it can be checked: the
CPU is a chip whose GEMM peak and streaming bandwidth are measured at the start
(hardware.measure_cpu_chip), the train step of each config is compiled for it, its HLO totals
priced exactly as aot_compile.py prices a TPU program, and the serial bound (compute + memory,
one device so no collectives) compared with the step's measured median time.
"""

import jax

import bench_system  # also puts the repository on sys.path, through benchlib
from benchlib import emit
from s5scale import cost_model, hardware, hlo_stats


def calibrate(config, chip: hardware.Chip, repeats: int) -> dict:
  """Measured step time against the cost model's bounds for `config` on one device of `chip`."""
  built = bench_system.build_step(config)
  step_s, _ = bench_system.median_step_seconds(built, repeats)
  totals = hlo_stats.step_totals(built["compiled"].as_text())
  tokens = config.data.batch_size * config.data.seq_len
  model_flops = 6.0 * cost_model.matmul_params(built["state"].params) * tokens
  no_collectives = dict(ici_s=0.0, dcn_s=0.0, by_kind={})
  roofline = cost_model.bounds(totals, no_collectives, chip, model_flops, tokens)
  return dict(step_s=step_s, serial_s=roofline["serial_s"], overlapped_s=roofline["step_s"],
              compute_s=roofline["compute_s"], memory_s=roofline["memory_s"],
              matmul_gflop=totals["matmul_flops"] / 1e9, hbm_gb=totals["hbm_bytes"] / 1e9,
              serial_over_measured=roofline["serial_s"] / step_s,
              overlapped_over_measured=roofline["step_s"] / step_s)


def bench_calibrate(args) -> dict:
  chip = hardware.measure_cpu_chip(args.gemm_size)
  result = {"bench": "calibrate", "device": jax.devices()[0].device_kind,
            "gemm_peak_gflop_per_s": chip.peak_flops / 1e9,
            "stream_gb_per_s": chip.hbm_bandwidth / 1e9}
  for name in args.configs:
    result[name] = calibrate(bench_system.load_config(name), chip, args.repeats)
  emit(result)
  return result


def add_flags(parser) -> None:
  parser.add_argument("--configs", nargs="+", default=["audio_small", "text_small"])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--gemm-size", type=int, default=2048)
