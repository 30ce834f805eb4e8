"""Device mesh, logical axis rules and shardings; multi-process initialisation.

docs/design.md, "Mesh and logical axes", describes the rules."""

import contextlib
import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Ordered by how much each axis carries, least first: mesh_utils places the last axes on the
# closest chips. `context` (time split in segments) moves one (batch, P') end state per layer,
# less than fsdp's parameter gathers and far less than model's activation gathers.
MESH_AXES = ("data", "context", "fsdp", "model")

# The one table: logical names used by nn/ -> mesh axes. Time ("length") is split over `context`
# into one segment per device; each device scans its own segment and the layer hands the states
# across segments with one small all-gather (ssm/context_parallel.py), never inside the scan.
# Between blocks the residual stream is split over H on `model` (Megatron's sequence parallelism
# turned 90 degrees): norms, gates and residual adds run on H/model, H is all-gathered once into
# an "act_gathered" activation before each projection group and reduce-scattered after it.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("state", "model"),      # P'
    ("channel", "model"),    # S4D's H: independent SISO channels, each whole on one device
    ("mlp", "model"),        # MLP / GLU width
    ("embed", "fsdp"),       # the other dimension of large parameters
    ("act_embed", "model"),  # the residual stream between blocks: (batch, L, H/model)
    ("act_gathered", None),  # a projection's input, gathered to whole H
    ("vocab", None),
    ("layers", None),
)


class MeshConfigError(ValueError):
  """A mesh that cannot be built on the devices at hand."""


# Set by launch/tpu_worker.sh on every Cloud TPU VM it starts a job on. There JAX finds its peers in
# the VM metadata (jax/_src/clusters/cloud_tpu_cluster.py), not in the environment, so only an
# explicit marker tells "one of several TPU hosts" from "a laptop".
DISTRIBUTED_MARKER = "S5SCALE_DISTRIBUTED"
# Set in the environment by GKE (one slice) and by multislice launchers that export it.
CLUSTER_ENV_KEYS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                    "MEGASCALE_COORDINATOR_ADDRESS")


def initialize_distributed() -> None:
  """Starts jax.distributed when launched as several processes.

  launch/local.sh sets S5SCALE_COORDINATOR / S5SCALE_NUM_PROCESSES / S5SCALE_PROCESS_ID (CPU, gloo).
  On TPU VMs (S5SCALE_DISTRIBUTED=1 from launch/tpu_worker.sh, or a GKE/multislice environment)
  `jax.distributed.initialize()` with no arguments discovers the peers itself; on a single host it
  starts a one-process client, which is harmless and gives it the preemption sync point too.
  """
  coordinator = os.environ.get("S5SCALE_COORDINATOR")
  if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ["S5SCALE_NUM_PROCESSES"]),
                               process_id=int(os.environ["S5SCALE_PROCESS_ID"]))
  elif os.environ.get(DISTRIBUTED_MARKER) == "1" or any(map(os.environ.get, CLUSTER_ENV_KEYS)):
    jax.distributed.initialize()


def launched_process_count() -> int:
  """How many processes the launcher says this job has (1 when it says nothing).

  Known without jax.distributed: it tells a lone process from one of several that were never
  connected (then no preemption sync point exists; see preemption.PreemptionWatcher.connect).
  """
  if os.environ.get("S5SCALE_NUM_PROCESSES"):
    return int(os.environ["S5SCALE_NUM_PROCESSES"])
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
  per_slice = len(hosts.split(",")) if hosts else 1
  return per_slice * int(os.environ.get("MEGASCALE_NUM_SLICES") or 1)


def resolve_axis_sizes(sizes: dict, total: int, prefix: str) -> tuple[int, ...]:
  """Fills a single -1 so the product is `total`; names the offending keys otherwise."""
  keys = [f"{prefix}{axis}" for axis in MESH_AXES]
  values = [int(sizes[axis]) for axis in MESH_AXES]
  if values.count(-1) > 1:
    raise MeshConfigError(f"at most one of {keys} may be -1, got {values}")
  known = int(np.prod([v for v in values if v != -1]))
  if any(v == 0 or v < -1 for v in values):
    raise MeshConfigError(f"{keys} must be positive or -1, got {values}")
  if -1 in values:
    if total % known:
      raise MeshConfigError(f"{keys}={values}: {total} devices are not divisible by {known}")
    values[values.index(-1)] = total // known
  if int(np.prod(values)) != total:
    raise MeshConfigError(
        f"{keys}={values} multiply to {int(np.prod(values))}, but there are {total} devices")
  return tuple(values)


def mesh_shape(mesh_config, num_devices: int, num_slices: int = 1):
  """(ici_shape, dcn_shape) in MESH_AXES order, from mesh_config keys named after the axes
  (data, context, fsdp, model) and dcn_ plus the name."""
  dcn = resolve_axis_sizes({a: mesh_config[f"dcn_{a}"] for a in MESH_AXES}, num_slices, "mesh.dcn_")
  if num_devices % num_slices:
    raise MeshConfigError(f"{num_devices} devices do not split into {num_slices} slices")
  ici = resolve_axis_sizes({a: mesh_config[a] for a in MESH_AXES}, num_devices // num_slices,
                           "mesh.")
  return ici, dcn


def num_slices(devices) -> int:
  """Multislice TPU devices carry a slice_index; everything else is one slice."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = mesh_shape(mesh_config, len(devices), num_slices(devices))
  # Splitting a physical axis lets e.g. model=4 live on a 16x16 torus (v5e-256), which the
  # default refuses: it raised for multislice and fell back to an unoptimised order otherwise.
  if num_slices(devices) > 1:
    device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                         allow_split_physical_axes=True)
  else:
    try:
      device_array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    except (NotImplementedError, ValueError, AssertionError):
      # Virtual CPU devices have no physical topology to optimise for.
      device_array = np.asarray(devices).reshape(ici)
  return Mesh(device_array, MESH_AXES)


def logical_shardings(abstract_tree, mesh: Mesh):
  """NamedShardings for a tree whose leaves may carry nn.Partitioned logical names."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


@contextlib.contextmanager
def logical_constraints(mesh: Mesh):
  """While tracing under it, nn.with_logical_constraint pins activations to the mesh axes of
  LOGICAL_AXIS_RULES (outside it Flax makes them no-ops). Without the pins, XLA shards a layer's
  matmul like its fsdp-sharded kernel and moves activations instead of gathering the kernel."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(
      LOGICAL_AXIS_RULES):
    yield


def on_mesh(fn, mesh: Mesh):
  """fn traced under logical_constraints(mesh): what a step function is jitted as."""
  def traced_on_mesh(*args):
    with logical_constraints(mesh):
      return fn(*args)
  return traced_on_mesh


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that carry their target sharding (for restore and AOT lowering)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim over (data, fsdp); everything else whole."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def batch_ways(mesh: Mesh) -> int:
  """How many parts batch_sharding splits the rows into: a batch must be a multiple of it."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Each process contributes its local rows; the result is one global array per key."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
