"""Ahead-of-time compilation for TPU slices (tools/aot_compile.py) and what it relies on.

Oracles: the real data pipeline's batches (for example_batch), parameter counts and matmul
FLOPs written from the model's equations, loop trip counts set by the test, exit codes of a
second process. The TPU compiles need libtpu (`pip install -e .[tpu]`); only they are skipped,
and say so, when it cannot be imported.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
from jax.sharding import Mesh, PartitionSpec

from s5scale import data
from s5scale import defaults
from s5scale import hlo_stats
from tests import helpers

GiB = 2**30
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'), so TPU programs "
    "cannot be compiled on this machine")


def aot_compile(*flags, timeout=300) -> tuple[subprocess.CompletedProcess, dict | None]:
  """Runs the tool in a second process; returns it and its JSON line (None if it printed none)."""
  process = subprocess.run(
      [sys.executable, os.path.join(helpers.REPO, "tools", "aot_compile.py"), *flags],
      env=helpers.env_for(1), capture_output=True, text=True, timeout=timeout, cwd=helpers.REPO)
  lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
  return process, (json.loads(lines[-1]) if lines else None)


# ----------------------------------------------------------------------------- example_batch

def _assert_same_layout(example: dict, real: dict):
  assert sorted(example) == sorted(real)
  for key, value in real.items():
    assert example[key].shape == value.shape, key
    assert example[key].dtype == value.dtype, key
    assert not np.any(example[key])


@pytest.mark.parametrize("kind, seq_len", [("text", 64), ("audio", 256)])
def test_example_batch_has_the_pipelines_layout_for_language_modelling(kind, seq_len):
  config = defaults.base_config().data
  config.kind, config.seq_len, config.batch_size = kind, seq_len, 4
  real = next(data.make_iterator(config, "train"))
  _assert_same_layout(data.example_batch(config, 4), real)


def test_example_batch_has_the_pipelines_layout_for_classification(tmp_path):
  for label in ("yes", "no"):
    (tmp_path / label).mkdir()
    for index in range(3):
      soundfile.write(tmp_path / label / f"{index}.wav",
                      np.random.default_rng(index).uniform(-0.5, 0.5, 800), 16000)
  config = defaults.base_config().data
  config.kind, config.task, config.source = "audio", "classify", str(tmp_path)
  config.seq_len, config.batch_size, config.heldout_fraction = 1000, 2, 0.0
  real = next(data.make_iterator(config, "train"))
  _assert_same_layout(data.example_batch(config, 2), real)


# ----------------------------------------------------------------------------- hlo_stats

def test_hlo_totals_multiply_loop_bodies_by_their_trip_counts():
  steps, size = 7, 64

  def repeated_matmul(x, w):
    return jax.lax.fori_loop(0, steps, lambda _, y: jnp.tanh(y @ w), x)

  x = jnp.ones((32, size), jnp.float32)
  w = jnp.ones((size, size), jnp.float32)
  text = jax.jit(repeated_matmul).lower(x, w).compile().as_text()
  totals = hlo_stats.step_totals(text)
  assert totals["unknown_loops"] == 0
  assert totals["matmul_flops"] == steps * 2 * 32 * size * size
  # Each iteration reads y and w and writes y at least once.
  assert totals["hbm_bytes"] >= steps * 4 * (2 * 32 * size + size * size)


def test_hlo_totals_count_collectives_inside_loops():
  devices = np.asarray(jax.devices()[:4])
  mesh = Mesh(devices, ("batch",))
  trips = 5

  def summed_in_loop(x):
    body = lambda _, y: y + 0.5 * jax.lax.psum(y, "batch")
    return jax.lax.fori_loop(0, trips, body, x)

  fn = jax.jit(jax.shard_map(summed_in_loop, mesh=mesh, in_specs=PartitionSpec("batch"),
                             out_specs=PartitionSpec("batch")))
  text = fn.lower(jnp.ones((4, 1000), jnp.float32)).compile().as_text()
  totals = hlo_stats.step_totals(text)
  assert totals["collectives"]["all-reduce"]["count"] == trips
  assert totals["collectives"]["all-reduce"]["bytes"] == trips * 1000 * 4
  # A ring all-reduce over 4 devices: each sends 2 * 3/4 of the array.
  assert totals["collectives"]["all-reduce"]["wire_bytes"] == trips * 1000 * 4 * 2 * 3 / 4


# ----------------------------------------------------------------------------- the tool

# The shapes the oracles below are written for (text_small at width 128, 8 rows of 256 bytes).
SMALL = ("--config=configs/text_small.py", "--config.model.d_model=128",
         "--config.model.ssm_size=128", "--config.data.batch_size=8", "--config.data.seq_len=256")


def _text_small_param_count(layers=4, h=128, p=128, vocab=260) -> int:
  """From the model's definition: S5 (B̃, C̃ complex as pairs; D; Λ re/im; log Δ), half GLU
  gate, pre-norm LayerNorm per block; final LayerNorm, embedding and head."""
  states = p // 2  # conj_sym
  per_block = (states * h * 2 + h * states * 2 + h + 2 * states + states  # S5
               + h * h + h                                             # glu_gate
               + 2 * h)                                                # LayerNorm
  return layers * per_block + 2 * h + vocab * h + h * vocab + vocab


@needs_libtpu
def test_text_small_compiles_for_v5e_2x2_and_fits():
  process, report = aot_compile(*SMALL, "--topology=v5e:2x2")
  assert process.returncode == 0, process.stderr[-3000:]
  assert report["fits"] and report["num_chips"] == 4 and report["chip"]["name"] == "v5e"
  assert report["num_params"] == _text_small_param_count()
  memory = report["memory"]
  assert 0 < memory["total"] < 16 * GiB
  # Pure data parallelism: every chip holds the float32 parameters and both Adam moments.
  assert memory["argument"] >= 3 * 4 * report["num_params"]
  cost = report["cost"]
  tokens_per_chip = 8 * 256 / 4
  matmul_params = 4 * (64 * 128 * 2 * 2 + 128 * 128) + 128 * 260
  assert cost["matmul_flops"] >= 6 * matmul_params * tokens_per_chip
  assert cost["matmul_flops"] <= 2 * 6 * matmul_params * tokens_per_chip
  # The gradients (float32, one per parameter) are all-reduced across the 4 data replicas.
  assert cost["collectives"]["all-reduce"]["bytes"] >= 0.9 * 4 * report["num_params"]
  assert 0 < cost["roofline"]["mfu"] <= 1
  # The serial bound adds the terms the overlapped one takes the largest of.
  assert 0 < cost["roofline"]["serial_mfu"] < cost["roofline"]["mfu"]
  assert "per-chip memory" in process.stdout and "roofline" in process.stdout


@needs_libtpu
def test_two_slices_put_the_dcn_axis_across_slices():
  process, report = aot_compile(*SMALL, "--topology=v5e:2x2", "--num_slices=2",
                                "--config.mesh.dcn_data=-1")
  assert process.returncode == 0, process.stderr[-3000:]
  assert report["num_chips"] == 8 and report["num_slices"] == 2
  assert report["mesh_dcn"] == {"data": 2, "context": 1, "fsdp": 1, "model": 1}
  assert report["mesh_ici"] == {"data": 4, "context": 1, "fsdp": 1, "model": 1}


@needs_libtpu
def test_a_model_over_the_chips_hbm_exits_1():
  # 4 blocks of H=16384: ~3.2B float32 parameters plus Adam moments, replicated on every chip.
  process, report = aot_compile("--config=configs/text_small.py", "--topology=v5e:2x2",
                                "--config.model.d_model=16384")
  assert process.returncode == 1, process.stderr[-3000:]
  assert report is not None and report["fits"] is False
  assert "HBM" in process.stderr
  if "memory" in report:
    assert report["memory"]["total"] > 16 * GiB


@pytest.mark.parametrize("flags, message", [
    (["--topology=v9z:2x2"], "--topology"),
    pytest.param(["--topology=v5e:2x2", "--config.mesh.model=3"], "mesh", marks=needs_libtpu),
    (["--topology=v5e:2x2", "--config.model.no_such_key=1"], "no_such_key"),
])
def test_bad_flags_or_config_exit_2(flags, message):
  process, _ = aot_compile("--config=configs/text_small.py", *flags, timeout=120)
  assert process.returncode == 2, process.stderr[-3000:]
  assert message in process.stderr


@needs_libtpu
def test_offload_remat_compiles_for_tpu_and_keeps_block_inputs_in_host_memory():
  reports = {}
  for remat in ("full", "offload"):
    process, reports[remat] = aot_compile(*SMALL, "--topology=v5e:2x2",
                                          f"--config.model.remat={remat}")
    assert process.returncode == 0, process.stderr[-3000:]
  # The block inputs, (layers, batch/chips, L, H) float32, leave HBM for the host's memory.
  block_inputs = 4 * (8 // 4) * 256 * 128 * 4
  assert reports["full"]["memory"]["host_temporary"] == 0
  assert reports["offload"]["memory"]["host_temporary"] >= block_inputs
  # Written to host memory in the forward pass and read back in the backward pass, over PCIe
  # (16 GB/s per v5e chip, the scaling book's figure), not at HBM speed.
  assert reports["full"]["cost"]["host_bytes"] == 0
  host_bytes = reports["offload"]["cost"]["host_bytes"]
  assert host_bytes >= 2 * block_inputs
  assert reports["offload"]["cost"]["roofline"]["host_s"] == pytest.approx(host_bytes / 1.6e10)
  # At this size the HBM side has nothing to gain (XLA reports no temporaries, and offloading
  # adds staging buffers); configs/audio_large.py's docstring gives the 8 GiB per chip it moves.


def test_sweep_table_has_one_row_per_compiled_result(tmp_path):
  sys.path.insert(0, os.path.join(helpers.REPO, "tools"))
  import aot_sweep  # pylint: disable=g-import-not-at-top
  result = dict(config="configs/audio_large.py", topology="v5e:16x16", num_slices=2,
                overrides=["--config.data.batch_size=256"], num_params=1_075_500_000, seq_len=131072,
                num_chips=512, fits=True, chip=dict(hbm_bytes=16 * GiB),
                memory=dict(total=12 * GiB),
                cost=dict(roofline=dict(compute_s=2.0, memory_s=1.0, collective_s=0.5, host_s=0.25,
                                        step_s=2.0, bound="compute", mfu=0.5,
                                        tokens_per_s_per_chip=32768.0, serial_s=3.75,
                                        serial_mfu=0.5 * 2.0 / 3.75,
                                        serial_tokens_per_s_per_chip=32768.0 * 2.0 / 3.75)))
  failed = dict(config="configs/text_large.py", topology="v5e:16x16", num_slices=1, fits=False,
                error="RESOURCE_EXHAUSTED: 20G of 16G")
  path = tmp_path / "results.jsonl"
  path.write_text(json.dumps(result) + "\n" + json.dumps(failed) + "\n")
  process = subprocess.run([sys.executable, os.path.join(helpers.REPO, "tools", "aot_sweep.py"),
                            f"--from_json={path}"], capture_output=True, text=True, timeout=60,
                           env=helpers.env_for(1))
  assert process.returncode == 1  # a row that does not fit
  rows = [line for line in process.stdout.splitlines() if line.startswith("| audio")
          or line.startswith("| text")]
  assert len(rows) == 2
  cells = [c.strip() for c in rows[0].strip("|").split("|")]
  assert cells == ["audio_large data.batch_size=256", "v5e:16x16 × 2", "1.08B", "131,072", "512",
                   "12.00", "75%", "2000 ms", "1000 ms", "500 ms", "250 ms", "compute", "50.0%",
                   "3750 ms", "26.7%", "17,476"]
  assert "does not compile" in rows[1] and "RESOURCE_EXHAUSTED" in rows[1]
