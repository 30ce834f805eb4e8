"""The AOT cost model (s5scale/cost_model.py) on hand-written HLO modules.

Oracles: each expected time is the ring formula written out below from the cited per-link
figures (X bytes gathered over k chips: each chip sends X*(k-1)/k; a wraparound ring uses both
directions of a link, a line one), not read back from the code. Device placement comes from a
hand-built Torus, so the physical axes each group spans are set by the test.
"""

import os
import sys

import pytest

from s5scale import cost_model, hardware, hlo_stats, replica_groups
from tests import helpers

V5E = hardware.CHIPS["TPU v5 lite"]
LINK = 4.5e10  # v5e, bytes/s one way per ICI link (scaling book, part 2)


def v5e_torus(shape, slices=1) -> cost_model.Torus:
  """Devices numbered x fastest, like libtpu's v5e topologies; slice after slice."""
  coords = [(x, y) for y in range(shape[1]) for x in range(shape[0])] * slices
  slice_ids = [s for s in range(slices) for _ in range(shape[0] * shape[1])]
  return cost_model.Torus(tuple(coords), tuple(slice_ids), tuple(shape),
                          hardware.torus_wraps(V5E, shape))


def module(body: str) -> str:
  return f"HloModule m\n\nENTRY %main (p: f32[4]) -> f32[4] {{\n{body}\n}}\n"


def seconds(hlo: str, torus) -> dict:
  return cost_model.collectives_seconds(hlo_stats.collective_calls(hlo), torus, V5E)


def test_v5e_wraps_only_full_16_chip_axes():
  assert hardware.torus_wraps(V5E, (16, 16)) == (True, True)
  assert hardware.torus_wraps(V5E, (8, 16)) == (False, True)
  assert hardware.torus_wraps(V5E, (4, 4)) == (False, False)
  v5p = hardware.CHIPS["TPU v5"]
  assert hardware.torus_wraps(v5p, (4, 4, 8)) == (True, True, True)
  assert hardware.torus_wraps(v5p, (2, 2, 4)) == (False, False, False)


def test_replica_group_spellings_expand_to_the_same_device_ids():
  explicit = "replica_groups={{0,2},{1,3}}"
  iota = "replica_groups=[2,2]<=[2,2]T(1,0)"
  named = "replica_groups=mesh['a'=2,'b'=2] {'a'}"
  permuted = "replica_groups=mesh['a'=2,'b'=2], device_ids=([2,2]T(1,0)) {'b'}"
  for spelling in (explicit, iota, named, permuted):
    assert replica_groups.expand(spelling) == [[0, 2], [1, 3]], spelling
  assert replica_groups.expand("replica_groups={}", 3) == [[0, 1, 2]]


def test_all_gather_over_a_full_v5e_ring_of_16_uses_both_directions():
  # f32[16,65536] gathered from f32[1,65536] over the 16 chips of x (a wraparound ring).
  x_bytes = 16 * 65536 * 4
  hlo = module("  %p = f32[1,65536]{1,0} parameter(0)\n"
               "  ROOT %ag = f32[16,65536]{1,0} all-gather(%p), channel_id=1, "
               "replica_groups=[16,16]<=[256], dimensions={0}, use_global_device_ids=true")
  priced = seconds(hlo, v5e_torus((16, 16)))
  assert priced["ici_s"] == pytest.approx(x_bytes * 15 / 16 / (2 * LINK))
  assert priced["dcn_s"] == 0


def test_all_gather_over_a_model_pair_shares_one_link():
  # Pairs of neighbours along x of a 4x4 slice (no wraparound): one link, one way each.
  x_bytes = 2 * 1024 * 4
  hlo = module("  %p = f32[1,1024]{1,0} parameter(0)\n"
               "  ROOT %ag = f32[2,1024]{1,0} all-gather(%p), channel_id=1, "
               "replica_groups=[8,2]<=[16], dimensions={0}, use_global_device_ids=true")
  priced = seconds(hlo, v5e_torus((4, 4)))
  assert priced["ici_s"] == pytest.approx(x_bytes / 2 / LINK)


def test_a_pair_across_the_wraparound_are_neighbours_and_interleaved_groups_share_links():
  # On a 16x16 torus: chips x=15 and x=0 of row 0 are joined by the wraparound link; groups
  # of every other chip of a row ({0,2,...,14} and {1,3,...,15}) each close a ring 2 links a
  # step, so the two groups share every link: half of both directions each.
  x_bytes = 8 * 1024 * 4
  pair = module("  %p = f32[4,1024]{1,0} parameter(0)\n"
                "  ROOT %ag = f32[8,1024]{1,0} all-gather(%p), channel_id=1, "
                "replica_groups={{15,0}}, dimensions={0}, use_global_device_ids=true")
  assert seconds(pair, v5e_torus((16, 16)))["ici_s"] == pytest.approx(x_bytes / 2 / LINK)
  strided = module("  %p = f32[1,1024]{1,0} parameter(0)\n"
                   "  ROOT %ag = f32[8,1024]{1,0} all-gather(%p), channel_id=1, "
                   "replica_groups={{0,2,4,6,8,10,12,14},{1,3,5,7,9,11,13,15}}, dimensions={0}, "
                   "use_global_device_ids=true")
  assert seconds(strided, v5e_torus((16, 16)))["ici_s"] == pytest.approx(
      x_bytes * 7 / 8 / (2 * LINK / 2))


def test_reduce_scatter_over_two_torus_axes_uses_both_axes_links():
  # All 16 chips of a 4x4 slice (no wraparound): x and y are lines, one link each way-direction.
  x_bytes = 16 * 4096 * 4
  hlo = module("  %p = f32[16,4096]{1,0} parameter(0)\n"
               "  ROOT %rs = f32[1,4096]{1,0} reduce-scatter(%p), channel_id=1, "
               "replica_groups=[1,16]<=[16], dimensions={0}, to_apply=%add")
  priced = seconds(hlo, v5e_torus((4, 4)))
  assert priced["ici_s"] == pytest.approx(x_bytes * 15 / 16 / (LINK + LINK))


def test_all_reduce_across_slices_adds_the_reduced_shard_over_dcn():
  # Groups {i, i+16}: the same chip of two 4x4 slices; nothing in-slice, the array over DCN.
  x_bytes = 1000 * 4
  hlo = module("  %p = f32[1000]{0} parameter(0)\n"
               "  ROOT %ar = f32[1000]{0} all-reduce(%p), channel_id=1, "
               "replica_groups=[16,2]<=[2,16]T(1,0), use_global_device_ids=true, to_apply=%add")
  priced = seconds(hlo, v5e_torus((4, 4), slices=2))
  assert priced["ici_s"] == 0
  assert priced["dcn_s"] == pytest.approx(2 * x_bytes * 1 / 2 / V5E.dcn_bandwidth)


def test_a_multislice_programs_megascale_all_reduce_is_priced_at_dcn_bandwidth():
  # How libtpu compiles a cross-slice gradient all-reduce: a host-transfer send per chip.
  buffer = 8 * 8 * 128 * 4
  hlo = module(
      "  %g = f32[8,8,128]{2,1,0:T(8,128)} parameter(0)\n"
      "  %t = token[] after-all()\n"
      "  ROOT %send.1 = (f32[8,8,128]{2,1,0:T(8,128)}, u32[], token[]) send(%g, %t), "
      "channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="
      '"xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_target='
      '"{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}')
  transfers = hlo_stats.dcn_transfers(hlo)
  torus = v5e_torus((2, 2), slices=2)
  priced = cost_model.collectives_seconds([], torus, V5E, transfers)
  # 2 slices: each chip sends and receives half its buffer twice, at 3.125 GB/s (v5e, DCN).
  assert priced["dcn_s"] == pytest.approx(2 * buffer * 1 / 2 / 3.125e9)
  assert priced["ici_s"] == 0


def test_vmem_arrays_are_not_hbm_traffic_and_host_arrays_are_priced_at_pcie():
  hlo = module(
      "  %a = f32[1024,256]{1,0} parameter(0)\n"
      "  %v = f32[1024,256]{1,0:T(8,128)S(1)} parameter(1)\n"
      "  %h = f32[8,1024,256]{2,1,0:T(8,128)S(5)} parameter(2)\n"
      "  %i = s32[] parameter(3)\n"
      "  %sum = f32[1024,256]{1,0} add(%a, %v)\n"
      "  %u = f32[1,1024,256]{2,1,0} reshape(%sum)\n"
      "  ROOT %off = f32[8,1024,256]{2,1,0:T(8,128)S(5)} dynamic-update-slice(%h, %u, %i, %i, %i)")
  totals = hlo_stats.step_totals(hlo)
  array = 1024 * 256 * 4
  # add reads a (HBM) and v (VMEM) and writes sum (HBM); reshape reads and writes one array in
  # HBM; the update reads u from HBM and writes it into host memory.
  assert totals["hbm_bytes"] == 2 * array + 2 * array + array
  assert totals["vmem_bytes"] == array
  assert totals["host_bytes"] == array
  roofline = cost_model.bounds(totals, dict(ici_s=0.0, dcn_s=0.0, by_kind={}), V5E,
                               model_flops=0.0, tokens_per_chip=1.0)
  assert roofline["host_s"] == pytest.approx(array / 1.6e10)  # PCIe, scaling book part 2
  assert roofline["memory_s"] == pytest.approx(totals["hbm_bytes"] / 819e9)


def test_overlapped_bound_is_the_largest_term_and_serial_the_sum():
  totals = dict(matmul_flops=197e12 * 0.3, hbm_bytes=819e9 * 0.5, host_bytes=1.6e10 * 0.1)
  roofline = cost_model.bounds(totals, dict(ici_s=0.15, dcn_s=0.05, by_kind={}), V5E,
                               model_flops=197e12 * 0.25, tokens_per_chip=1000.0)
  assert roofline["step_s"] == pytest.approx(0.5) and roofline["bound"] == "memory"
  assert roofline["serial_s"] == pytest.approx(0.3 + 0.5 + 0.2 + 0.1)
  assert roofline["mfu"] == pytest.approx(0.25 / 0.5)
  assert roofline["serial_mfu"] == pytest.approx(0.25 / 1.1)
  assert roofline["serial_tokens_per_s_per_chip"] == pytest.approx(1000 / 1.1)


# ----------------------------------------------------------------------------- calibration

def test_serial_bound_of_the_cpu_train_step_is_within_0_2_to_2_of_the_measured_step():
  """The model against a measurement: text_small (2 layers, 256-token windows, to compile and run
  in about a minute) on this CPU, its GEMM peak and stream bandwidth measured first.

  Band 0.2..2 for serial bound / measured step. Above 1 the model calls the step faster than it
  ran; it can a little, since its HBM bytes count every unfused array while a CPU cache keeps
  some, and timings on a shared 2-core machine vary, but not by 2x. Below 1 the model leaves out
  the step's elementwise arithmetic (the S5 recurrence's complex products: 0.25e9 element
  operations a step at full size) and the cost of dispatching each of thousands of
  instructions. `bench.py calibrate` measures 0.31 (text_small) and 0.35 (audio_small) at full
  size on a loaded machine, this test 0.59; a ratio under 0.2 would mean the model misses most
  of the step.
  """
  sys.path.insert(0, os.path.join(helpers.REPO, "tools"))
  import bench_calibrate  # pylint: disable=g-import-not-at-top
  import bench_system  # pylint: disable=g-import-not-at-top
  config = bench_system.load_config("text_small", model__num_layers=2, data__seq_len=256)
  chip = hardware.measure_cpu_chip(gemm_size=1024)
  result = bench_calibrate.calibrate(config, chip, repeats=3)
  print(f"text_small (2 layers, L=256) on CPU: measured {result['step_s'] * 1e3:.0f} ms, serial "
        f"bound {result['serial_s'] * 1e3:.0f} ms, ratio {result['serial_over_measured']:.2f}")
  assert 0.2 <= result["serial_over_measured"] <= 2.0
