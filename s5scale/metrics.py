"""Metrics to metrics.jsonl and tensorboardX, a progress line with ETA, throughput and MFU."""

import itertools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from s5scale import hardware, hlo_stats, storage

# Dense bf16 peak FLOP/s per chip, for MFU on accelerators: TPUs' from hardware.CHIPS (sources
# cited there), GPUs' from NVIDIA's data sheets (dense bf16 Tensor Core); CPUs are measured instead.
PEAK_FLOPS = {**{kind: chip.peak_flops for kind, chip in hardware.CHIPS.items()},
              "TPU v5e": hardware.CHIPS["TPU v5 lite"].peak_flops,
              "TPU v5p": hardware.CHIPS["TPU v5"].peak_flops,
              "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


_WRITER_IDS = itertools.count()


class MetricsWriter:
  """Appends one JSON object per call (storage.append_jsonl) to `jsonl_path` and mirrors scalars to tensorboard.

  Only process 0 writes (every process computes the same global metrics).
  """

  def __init__(self, jsonl_path: str, tb_dir: str):
    self.enabled = jax.process_index() == 0
    self.jsonl_path = jsonl_path
    self._tb = None
    if self.enabled:
      storage.makedirs(storage.path(jsonl_path).parent)
      from tensorboardX import SummaryWriter  # imported lazily: it is slow to import
      # Event files are named by the second they were opened in: two writers opened within one
      # second (an eval per checkpoint, a trainer and an eval job) would overwrite each other.
      self._tb = SummaryWriter(tb_dir, filename_suffix=f".{os.getpid()}.{next(_WRITER_IDS)}")

  def write(self, step: int, scalars: dict, **extra) -> None:
    if not self.enabled:
      return
    plain = {k: _plain(v) for k, v in scalars.items()}
    storage.append_jsonl(self.jsonl_path, {"step": int(step), **plain, **extra})
    # After _plain, a 0-d array of any kind (jax.device_get returns those) is a Python number.
    for name, value in plain.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        self._tb.add_scalar(name, float(value), int(step))
    self._tb.flush()

  @property
  def tensorboard(self):
    return self._tb

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _plain(value):
  value = np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
  if isinstance(value, float) and not np.isfinite(value):
    return str(value)  # JSON has no NaN/inf
  return value


def read_jsonl(path: str) -> list[dict]:
  return storage.read_jsonl(path)


class Progress:
  """Step rate, ETA and throughput since the first timed step (compilation excluded)."""

  def __init__(self, first_step: int, last_step: int):
    self.first_step, self.last_step = first_step, last_step
    self.start_time, self.start_step = None, first_step

  def update(self, step: int) -> dict:
    now = time.time()
    if self.start_time is None:
      self.start_time, self.start_step = now, step
      return {}
    steps_per_s = (step - self.start_step) / max(now - self.start_time, 1e-9)
    eta_s = (self.last_step - step) / max(steps_per_s, 1e-9)
    return {"steps_per_s": steps_per_s, "eta_s": eta_s}


def format_count(count: float) -> str:
  """20480 -> "20.5K", 1.2e6 -> "1.2M": three significant figures at most, never "0.00M"."""
  for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
    if count >= scale:
      return f"{count / scale:.3g}{suffix}"
  return str(int(count))


def format_duration(seconds: float | None) -> str:
  """"1h02m03s"; "--" before the first timed interval (no rate yet)."""
  if seconds is None:
    return "--"
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def compiled_flops(compiled) -> float:
  """Matmul FLOPs of one call of a compiled function, with every loop counted by its trip count.

  (XLA's cost_analysis counts a loop body once: the layer scan and the chunked time scan would be
  undercounted.) Elementwise work is left out, as model-FLOPs utilisation conventionally does.
  """
  try:
    return float(hlo_stats.step_totals(compiled.as_text())["matmul_flops"])
  except Exception as error:  # a parse failure must not stop training; MFU is then unreported
    logging.warning("could not count FLOPs of the compiled step: %s", error)
    return 0.0


def peak_flops_per_device() -> float:
  kind = jax.devices()[0].device_kind
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # "TPU v5 lite" before "TPU v5"
    if kind.startswith(name):
      return PEAK_FLOPS[name]
  peak = hardware.measure_gemm_peak()
  logging.info("no published peak for %r: measured a float32 GEMM at %.1f GFLOP/s", kind,
               peak / 1e9)
  return peak
