"""What one chip can do per second, for the roofline in s5scale/cost_model.py.

TPU figures are published ones, each cited beside its constant. The scaling book is "How to Scale
Your Model", part 2, https://jax-ml.github.io/scaling-book/tpus/ (table "Here are interconnect
figures", and the PCIe/DCN paragraph under it; read at jax-ml/scaling-book commit 54e2c43).
A CPU has no published figures that fit this machine, so its chip is measured
(measure_cpu_chip).
"""

import dataclasses
import time

import jax
import jax.numpy as jnp

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float          # dense bf16 FLOP/s (a CPU: measured float32 GEMM FLOP/s)
  hbm_bytes: float           # memory per chip, bytes
  hbm_bandwidth: float       # bytes/s (a CPU: measured streaming bandwidth)
  ici_link_bandwidth: float  # bytes/s over ONE ICI link in ONE direction (0: no ICI)
  host_bandwidth: float      # bytes/s between the chip and its host's memory (PCIe), each way
  dcn_bandwidth: float       # bytes/s of data-center network per chip, egress
  wraparound: str            # which torus axes have wraparound links: "16" or "cubes" (below)


# Keyed by jax's device_kind. Peak FLOP/s, HBM and HBM bandwidth: Cloud TPU system architecture
# pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p-training, /v6e).
CHIPS = {
    # v4: 275 TFLOP/s, 32 GiB at 1200 GB/s. Scaling book: "TPU v4p | 4.5e10" bytes/s one-way per
    # link; PCIe "1.6e10 bytes / second per TPU"; DCN "6.25e9 bytes / second per TPU".
    "TPU v4": Chip("v4", 275e12, 32 * GiB, 1200e9, 4.5e10, 1.6e10, 6.25e9, "cubes"),
    # v5e: 197 TFLOP/s, 16 GB at 819 GB/s. Scaling book: "TPU v5e | 4.5e10" one-way per link;
    # PCIe 1.6e10; DCN "3.125e9 for TPU v5e" (Cloud's v6e page: 2 x 100 Gbps NICs per 8-chip
    # v5e host, the same 3.125 GB/s per chip).
    "TPU v5 lite": Chip("v5e", 197e12, 16 * GiB, 819e9, 4.5e10, 1.6e10, 3.125e9, "16"),
    # v5p: 459 TFLOP/s, 95 GiB at 2765 GB/s. Scaling book: "TPU v5p | 9e10" one-way per link;
    # PCIe 1.6e10; DCN 6.25e9 (Cloud's v5p page: "DCN bandwidth per chip (Gbps) 50", the same).
    "TPU v5": Chip("v5p", 459e12, 95 * GiB, 2765e9, 9e10, 1.6e10, 6.25e9, "cubes"),
    # v6e (Trillium): 918 TFLOP/s, 32 GB at 1638 GB/s. Scaling book: "TPU v6e | 9e10" one-way
    # per link; PCIe "3.2e10 for TPU v6e"; DCN "12.5e9 for TPU v6e".
    "TPU v6 lite": Chip("v6e", 918e12, 32 * GiB, 1638e9, 9e10, 3.2e10, 12.5e9, "16"),
}


def torus_wraps(chip: Chip, shape: tuple[int, ...]) -> tuple[bool, ...]:
  """Which axes of a slice of `shape` chips have wraparound links (a ring, not a line).

  Scaling book, "TPU Networking": v5e and v6e pods are one 16x16 torus "with wraparounds along
  any axis of size 16 (meaning an 8x16 has a wraparound on the long axis) ... smaller
  topologies can be requested without wraps on dims < 16". v4 and v5p: "Any multiple of a full
  cube (e.g. 4x4x4 or 4x4x8) will have wraparounds provided by the optical switches", and
  "a 2x2x4 won't have any wraparounds".
  """
  if chip.wraparound == "16":
    return tuple(size == 16 for size in shape)
  full_cubes = len(shape) == 3 and all(size % 4 == 0 for size in shape)
  return tuple(full_cubes and size > 1 for size in shape)


def measure_gemm_peak(size: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a float32 GEMM on the default device, the best of a few runs."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


class InPlaceStream:
  """Reads and writes `num_bytes` of float32 per call: an in-place x*0.5+1 (the buffer is
  donated), so that what is timed is the memory, not the allocator handing a fresh output buffer
  its pages."""

  def __init__(self, num_bytes: int):
    self.buffer = jnp.ones((num_bytes // 4,), jnp.float32)
    self.update = jax.jit(lambda x: x * 0.5 + 1.0, donate_argnums=0)

  def __call__(self):
    self.buffer = self.update(self.buffer)
    return self.buffer


def measure_stream_bandwidth(num_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
  """Bytes/s of the default device's memory (one read and one write per element of an
  InPlaceStream), the best of `repeats` timed calls; 256 MiB is far beyond any CPU cache."""
  stream = InPlaceStream(num_bytes)
  stream().block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    stream().block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * num_bytes / best


def measure_cpu_chip(gemm_size: int = 2048) -> Chip:
  """The default device as a Chip: measured GEMM peak and streaming bandwidth, no interconnect."""
  peak = measure_gemm_peak(gemm_size)
  bandwidth = measure_stream_bandwidth()
  return Chip("cpu", peak, 0.0, bandwidth, 0.0, bandwidth, 0.0, "16")
