"""Compile the real train step for a TPU slice ahead of time, on any machine: does it fit, how fast?

  python tools/aot_compile.py --config=configs/audio_large.py --topology=v5e:16x16
  python tools/aot_compile.py --config=configs/audio_large.py --topology=v5e:16x16 --num_slices=2
  python tools/aot_compile.py --config=configs/text_small.py --topology=v5e:2x2 \
      --config.data.batch_size=16

libtpu (`pip install -e .[tpu]`) supplies compile-only devices for the topology through
jax.experimental.topologies, so no TPU is needed. Topologies are libtpu names: v5e:16x16 is
ACCELERATOR_TYPE v5litepod-256, v4:4x4x4 is v4-128 (64 chips), v5p:4x4x4 is v5p-128, v6e:16x16
is v6e-256. --num_slices=K compiles for K such slices over DCN (set the mesh.dcn_* sizes; -1 in
mesh.dcn_data fills with K).

It builds the mesh, state shardings and train step exactly as s5scale.training does, with a batch
of zeros of the config's shapes (no data files are read), and prints per-chip memory, FLOPs and
bytes per step, collectives, and a roofline estimate of step time and MFU, then one JSON line.

Exit status: 0 fits; 1 the step needs more memory per chip than the chip's HBM; 2 bad config,
flags or topology (or libtpu missing).
"""

import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # never grab a local TPU: we only compile
# Compile-only: no chip to guard, so several compiles (pytest workers) may load libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from s5scale import cli, config_check, cost_model, data, hardware, hlo_stats, parallel, training

GiB = 2**30
EXIT_OVER_HBM = 1


CHIPS = hardware.CHIPS
# libtpu keeps part of HBM for itself: it reports 15.75G available on a 16 GiB v5e.
RESERVED_HBM = GiB // 4
MEGACORE = ("v4", "v5p")  # two TensorCores per chip, used as one device

_TOPOLOGY = flags.DEFINE_string("topology", None, "libtpu topology name, e.g. v5e:16x16, v4:4x4x4.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of that topology, joined over DCN.")
_DUMP_HLO = flags.DEFINE_string("dump_hlo", None, "Also write the compiled HLO text to this file.")


class UsageError(ValueError):
  """Bad flags or topology: exit 2."""


def tpu_devices(topology: str, num_slices: int) -> list:
  """Compile-only devices of `num_slices` slices of `topology` (one per chip)."""
  if num_slices < 1:
    raise UsageError(f"--num_slices must be >= 1, got {num_slices}")
  generation = topology.split(":")[0]
  if ":" not in topology or generation not in [chip.name for chip in CHIPS.values()]:
    raise UsageError(f"--topology={topology!r}: expected GENERATION:SHAPE with GENERATION one of "
                     f"{[chip.name for chip in CHIPS.values()]}, e.g. v5e:16x16 or v4:4x4x4")
  from jax.experimental import topologies
  options = {"chip_config_name": "megacore"} if generation in MEGACORE else {}
  if num_slices > 1:
    options["num_slices"] = num_slices
  try:
    return list(topologies.get_topology_desc(topology, "tpu", **options).devices)
  except RuntimeError as error:
    if "not installed" in str(error):
      raise UsageError("libtpu is not installed, so TPU programs cannot be compiled here: "
                       "pip install -e '.[tpu]'") from None
    raise UsageError(f"--topology={topology!r} is not a topology libtpu knows: {error}") from None


def compile_train_step(config, devices):
  """The compiled train step, model size and timings, built exactly as training.train builds it."""
  process_count = len({d.process_index for d in devices})
  config_check.check_on_devices(config, devices, process_count)
  mesh = parallel.make_mesh(config.mesh, devices)
  try:
    sample_batch = data.example_batch(config.data, config.data.batch_size)
  except ValueError as error:  # a bad data.* value, named by the message
    raise cli.ConfigError(str(error)) from None
  start = time.perf_counter()
  model, optimizer, schedule, abstract_state, state_shardings = training.build_model_and_state(
      config, mesh, sample_batch)
  train_step = training.jit_train_step(config, mesh, model, optimizer, schedule, state_shardings)
  lowered = train_step.lower(abstract_state, training.abstract_batch(sample_batch, mesh))
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  params = jax.tree.leaves(abstract_state.params)
  sizes = dict(
      num_params=sum(p.size for p in params),
      matmul_params=cost_model.matmul_params(abstract_state.params),
      lower_s=lowered_at - start, compile_s=time.perf_counter() - lowered_at)
  return compiled, mesh, process_count, sizes


def memory_report(compiled) -> dict:
  """Per-chip bytes. The donated state's outputs alias its arguments, so they count once."""
  stats = compiled.memory_analysis()
  report = dict(argument=stats.argument_size_in_bytes, output=stats.output_size_in_bytes,
                alias=stats.alias_size_in_bytes, temporary=stats.temp_size_in_bytes,
                generated_code=stats.generated_code_size_in_bytes)
  report["total"] = (report["argument"] + report["output"] - report["alias"] + report["temporary"]
                     + report["generated_code"])
  # Buffers in the host's memory (model.remat="offload"): not part of the HBM total.
  report["host_temporary"] = getattr(stats, "host_temp_size_in_bytes", 0)
  return report


def cost_report(compiled, config, chip: hardware.Chip, devices, matmul_params: int) -> dict:
  """XLA's cost analysis, the loop-aware HLO totals, and the bounds built on the latter
  (s5scale/cost_model.py). `devices` are the program's devices in order (the mesh's, flat)."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  text = compiled.as_text()
  totals = hlo_stats.step_totals(text)
  tokens_per_chip = config.data.batch_size * config.data.seq_len / len(devices)
  model_flops = 6.0 * matmul_params * tokens_per_chip  # forward + backward, no recomputation
  collective = cost_model.collectives_seconds(
      hlo_stats.collective_calls(text), cost_model.torus_of(devices, chip), chip,
      hlo_stats.dcn_transfers(text))
  return dict(
      xla_flops=float(analysis.get("flops", 0.0)),
      xla_bytes_accessed=float(analysis.get("bytes accessed", 0.0)),
      matmul_flops=totals["matmul_flops"], bytes_accessed=totals["hbm_bytes"],
      vmem_bytes=totals["vmem_bytes"], host_bytes=totals["host_bytes"],
      collectives=totals["collectives"], unknown_loops=totals["unknown_loops"],
      model_flops=model_flops,
      roofline=cost_model.bounds(totals, collective, chip, model_flops, tokens_per_chip))


def _gib(n):
  return f"{n / GiB:8.2f} GiB"


def print_summary(result: dict) -> None:
  memory, cost, chip = result["memory"], result["cost"], result["chip"]
  roofline = cost["roofline"]
  lines = [
      f"{result['config']} on {result['topology']} x {result['num_slices']} slice(s): "
      f"{result['num_chips']} chips ({chip['name']}, {chip['hbm_bytes'] / GiB:.0f} GiB HBM), "
      f"{result['num_processes']} hosts",
      f"mesh {result['mesh']}: per slice (ICI) {result['mesh_ici']}, across slices (DCN) "
      f"{result['mesh_dcn']}",
      f"model {result['num_params'] / 1e6:.1f}M parameters; global batch "
      f"{result['batch_size']} x {result['seq_len']}; lowered in {result['lower_s']:.1f} s, "
      f"compiled in {result['compile_s']:.1f} s",
      "per-chip memory:",
      f"  arguments       {_gib(memory['argument'])}",
      f"  outputs         {_gib(memory['output'])}  ({_gib(memory['alias']).strip()} aliased "
      "to donated arguments)",
      f"  temporaries     {_gib(memory['temporary'])}",
      f"  generated code  {_gib(memory['generated_code'])}",
      f"  total           {_gib(memory['total'])}  = {memory['total'] / chip['hbm_bytes']:.0%} "
      f"of {chip['hbm_bytes'] / GiB:.0f} GiB HBM -> {'fits' if result['fits'] else 'DOES NOT FIT'}",
      f"  offloaded to host memory {_gib(memory['host_temporary'])}",
      "per-chip cost of one step (loops counted by trip count):",
      f"  matmul FLOPs    {cost['matmul_flops']:.3e}   (model 6*N*D: {cost['model_flops']:.3e})",
      f"  HBM bytes       {cost['bytes_accessed']:.3e}   (not counted: {cost['vmem_bytes']:.3e} in "
      f"VMEM; {cost['host_bytes']:.3e} to/from host memory, priced at PCIe speed)",
      f"  XLA cost_analysis (each loop body once): {cost['xla_flops']:.3e} FLOPs, "
      f"{cost['xla_bytes_accessed']:.3e} bytes",
      "collectives per step (per chip; time on the links of the torus axes each group spans):",
      *[f"  {kind:19s} {c['count']:6d} x  {c['bytes'] / 2**20:12.1f} MiB arrays, "
        f"{roofline['collective_by_kind'].get(kind, 0.0) * 1e3:9.1f} ms"
        for kind, c in cost["collectives"].items()],
      f"roofline ({chip['name']}: {chip['peak_flops'] / 1e12:.0f} TFLOP/s, "
      f"{chip['hbm_bandwidth'] / 1e9:.0f} GB/s HBM, {chip['ici_link_bandwidth'] / 1e9:.0f} GB/s per "
      f"ICI link each way, {chip['dcn_bandwidth'] / 1e9:.2f} GB/s DCN and "
      f"{chip['host_bandwidth'] / 1e9:.0f} GB/s PCIe per chip):",
      f"  compute {roofline['compute_s'] * 1e3:.1f} ms, memory {roofline['memory_s'] * 1e3:.1f} ms,"
      f" collectives {roofline['collective_s'] * 1e3:.1f} ms (ICI {roofline['ici_s'] * 1e3:.1f}, "
      f"DCN {roofline['dcn_s'] * 1e3:.1f}), host {roofline['host_s'] * 1e3:.1f} ms",
      f"  overlapped: step >= {roofline['step_s'] * 1e3:.1f} ms ({roofline['bound']}-bound), "
      f"{roofline['tokens_per_s_per_chip']:.0f} tokens/s/chip, MFU <= {roofline['mfu']:.1%}",
      f"  serial (nothing overlapped): {roofline['serial_s'] * 1e3:.1f} ms, "
      f"{roofline['serial_tokens_per_s_per_chip']:.0f} tokens/s/chip, MFU "
      f"{roofline['serial_mfu']:.1%}",
  ]
  if cost["unknown_loops"]:
    lines.append(f"  note: {cost['unknown_loops']} loop(s) with unreadable trip counts were "
                 "counted once")
  print("\n".join(lines), flush=True)


def run(config, topology: str, num_slices: int, config_path: str) -> int:
  devices = tpu_devices(topology, num_slices)
  chip = CHIPS[devices[0].device_kind]
  base = dict(config=config_path, topology=topology, num_slices=num_slices,
              num_chips=len(devices), chip=dataclasses.asdict(chip),
              batch_size=config.data.batch_size, seq_len=config.data.seq_len,
              overrides=[a for a in sys.argv[1:] if a.startswith("--config.")])
  try:
    compiled, mesh, num_processes, sizes = compile_train_step(config, devices)
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    # XLA refuses to compile a program that cannot fit the chip's HBM.
    print(f"error: the train step does not fit in {chip.hbm_bytes / GiB:.0f} GiB of HBM per "
          f"{chip.name} chip: {str(error).strip().splitlines()[0][:2000]}", file=sys.stderr)
    print(json.dumps(dict(base, fits=False, error=str(error)[:2000])), flush=True)
    return EXIT_OVER_HBM
  if _DUMP_HLO.value:
    with open(_DUMP_HLO.value, "w") as f:
      f.write(compiled.as_text())
  memory = memory_report(compiled)
  ici, dcn = parallel.mesh_shape(config.mesh, len(devices), parallel.num_slices(devices))
  result = dict(base, mesh=dict(mesh.shape), mesh_ici=dict(zip(parallel.MESH_AXES, ici)),
                mesh_dcn=dict(zip(parallel.MESH_AXES, dcn)), num_processes=num_processes, **sizes,
                memory=memory, fits=memory["total"] <= chip.hbm_bytes - RESERVED_HBM,
                cost=cost_report(compiled, config, chip, list(mesh.devices.flat),
                                 sizes["matmul_params"]))
  print_summary(result)
  print(json.dumps(result), flush=True)
  if not result["fits"]:
    print(f"error: {memory['total'] / GiB:.2f} GiB per chip exceeds the "
          f"{(chip.hbm_bytes - RESERVED_HBM) / GiB:.2f} GiB of the {chip.name}'s HBM that XLA "
          "can use", file=sys.stderr)
    return EXIT_OVER_HBM
  return 0


def main(argv) -> int:
  del argv
  if not _TOPOLOGY.value:
    print("error: --topology is required (e.g. v5e:16x16)", file=sys.stderr)
    return cli.EXIT_BAD_INPUT
  config_path = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
  try:
    return run(flags.FLAGS.config, _TOPOLOGY.value, _NUM_SLICES.value, config_path)
  except (UsageError, cli.ConfigError, parallel.MeshConfigError) as error:
    print(f"error: {error}", file=sys.stderr)
    return cli.EXIT_BAD_INPUT


if __name__ == "__main__":
  cli.define_flags(workdir=False)
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
