"""Time split across devices (the mesh's `context` axis): each device scans its segment from a
zero state, one all-gather hands the end states on (s5scale/ssm/context_parallel.py).

Oracles: the float64 NumPy loop of the recurrence (tests/ssm_oracle.py), the same scan run
unsplit on one device (values and gradients, float64, rtol 1e-10), the unsplit S4D convolution,
and the collectives in the compiled HLO.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from s5scale import config_check, parallel, ssm, training
from s5scale.nn.model import S5Model
from s5scale.ssm import recurrence
from tests import s4d_oracle
from tests.helpers import COLLECTIVES, hlo_computations, reachable, tiny_config
from tests.ssm_oracle import loop_recurrence, planar, random_problem

ROWS, STATES = 4, 3
SPEC = PartitionSpec("data", "context", None, None)   # (rows, L, 2, P)


def _mesh(context: int) -> Mesh:
  """8 devices as (data, context): rows split too, so the segments are not the only split."""
  return Mesh(np.asarray(jax.devices()[:8]).reshape(8 // context, context), ("data", "context"))


def _jit_on(mesh, function, *args):
  """function jitted and run with `mesh` as the tracing context's mesh (None: no mesh)."""
  if mesh is None:
    return jax.jit(function)(*args)
  with jax.set_mesh(mesh):
    return jax.jit(function)(*args)


def _states(a, b, keep, reverse, *, split: bool, impl="chunked"):
  """The recurrence's planar states; split: time over the context axis of the mesh in context."""
  return recurrence.linear_recurrence_planar(a, b, keep, reverse, impl=impl,
                                             interpret=impl == "pallas",
                                             sharding=SPEC if split else None)


def _problem(seed, length, *, varying, resets):
  """Float64 planar (a, b, keep) and the complex originals; `resets`: steps where every row
  resets, or None for no keep mask at all."""
  rng = np.random.default_rng(seed)
  a, b, keep = random_problem(rng, (ROWS,), length, STATES, varying=varying,
                              with_keep=resets is not None)
  if keep is not None:
    keep[:, list(resets)] = 0.0
  return (jnp.asarray(planar(a)), jnp.asarray(planar(b)),
          None if keep is None else jnp.asarray(keep)), (a, b, keep)


# (context, L, varying a, resets on every row, reverse); L = 24 splits into 12, 6 or 3 steps.
CASES = [
    (2, 24, False, None, False),
    (2, 24, False, None, True),
    (4, 24, False, (6, 12), False),          # resets exactly on segment boundaries
    (4, 24, False, (5, 11, 12), True),       # reverse: keep[k] cuts k+1 -> k, so 5 and 11 are
                                             # its boundaries
    (8, 24, True, (4, 9), False),            # per-step a (intervals), resets inside segments
    (8, 24, True, (3, 10, 21), True),
    (4, 23, False, (5, 11), False),          # L not a multiple of the segment: padded
    (4, 23, True, (5, 11), True),
    (8, 5, False, None, True),               # fewer steps than devices: padded segments
]


@pytest.mark.parametrize("context,length,varying,resets,reverse", CASES)
def test_split_scan_equals_unsplit_scan_and_the_loop(context, length, varying, resets, reverse):
  with jax.enable_x64(True):
    (a, b, keep), (a_c, b_c, keep_c) = _problem(context * 31 + length, length, varying=varying,
                                                resets=resets)
    run = functools.partial(_states, keep=keep, reverse=reverse)
    split = np.asarray(_jit_on(_mesh(context), functools.partial(run, split=True), a, b))
    whole = np.asarray(_jit_on(None, functools.partial(run, split=False), a, b))
  np.testing.assert_allclose(split, whole, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(split, planar(loop_recurrence(a_c, b_c, keep_c, reverse)),
                             rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("context,length,varying,resets,reverse", CASES)
def test_split_scan_gradients_equal_unsplit(context, length, varying, resets, reverse):
  with jax.enable_x64(True):
    (a, b, keep), _ = _problem(context * 17 + length, length, varying=varying, resets=resets)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=b.shape))

    def gradients(a, b, split):
      def loss(a, b):
        return jnp.sum(weights * _states(a, b, keep, reverse, split=split) ** 2)
      return jax.grad(loss, argnums=(0, 1))(a, b)

    split = _jit_on(_mesh(context), functools.partial(gradients, split=True), a, b)
    whole = _jit_on(None, functools.partial(gradients, split=False), a, b)
  for name, got, want in zip(("dL/da", "dL/db"), split, whole):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-12,
                               err_msg=name)


@pytest.mark.parametrize("impl", ["pallas", "reference"])
def test_every_local_implementation_splits_the_same(impl):
  """The segments run whatever the dispatcher picks: the Pallas kernel (in its interpreter) and the
  associative scan give the unsplit chunked scan's values and gradients."""
  with jax.enable_x64(True):
    (a, b, keep), _ = _problem(5, 24, varying=False, resets=(5, 11))
    weights = jnp.asarray(np.random.default_rng(2).normal(size=b.shape))

    def values_and_gradients(a, b, split, impl):
      def loss(a, b):
        return jnp.sum(weights * _states(a, b, keep, True, split=split, impl=impl) ** 2)
      return loss(a, b), jax.grad(loss, argnums=(0, 1))(a, b)

    got = _jit_on(_mesh(4), functools.partial(values_and_gradients, split=True, impl=impl), a, b)
    want = _jit_on(None, functools.partial(values_and_gradients, split=False, impl="chunked"),
                   a, b)
  for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("impl,context,length,varying", [
    ("chunked", 4, 23, True), ("pallas", 4, 24, False), ("reference", 8, 24, False)])
def test_both_directions_in_one_gather_equal_the_loop(impl, context, length, varying):
  """bidirectional_recurrence_planar (both directions through one shard_map and one gather):
  each direction's states equal the NumPy loop, and the gradients the unsplit scans'."""
  with jax.enable_x64(True):
    (a, b, _), (a_c, b_c, _) = _problem(context + length, length, varying=varying, resets=None)
    reset = np.zeros((ROWS, length), bool)
    reset[:, [5, 6, 11]] = True                      # 6 and 12: segment boundaries at context=4
    reset[1, 12] = True
    # Forward, a reset at k drops the state carried into k; backward, the one carried from k
    # into k-1 (the reverse scan's document ends before the next one starts).
    keeps = (1.0 - reset, np.concatenate([1.0 - reset[:, 1:], np.ones((ROWS, 1))], axis=1))
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(2,) + b.shape))

    def values_and_gradients(a, b, split):
      def states(a, b):
        return jnp.stack(recurrence.bidirectional_recurrence_planar(
            a, b, jnp.asarray(keeps[0]), impl=impl if split else "chunked",
            interpret=impl == "pallas", sharding=SPEC if split else None))
      loss = lambda a, b: jnp.sum(weights * states(a, b) ** 2)
      return states(a, b), jax.grad(loss, argnums=(0, 1))(a, b)

    got = _jit_on(_mesh(context), functools.partial(values_and_gradients, split=True), a, b)
    want = _jit_on(None, functools.partial(values_and_gradients, split=False), a, b)
  for reverse, keep in zip((False, True), keeps):
    np.testing.assert_allclose(
        np.asarray(got[0][int(reverse)]),
        planar(loop_recurrence(a_c, b_c, keep, reverse)), rtol=1e-10, atol=1e-12)
  for got_leaf, want_leaf in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("context", [2, 8])
def test_bidirectional_layer_with_resets_splits_the_same(context):
  """apply_ssm both ways with documents crossing segment boundaries and starting on them."""
  rng = np.random.default_rng(context)
  batch, length, width, half = 4, 32, 5, 3
  lambda_bar = rng.uniform(0.8, 0.99, half) * np.exp(1j * rng.uniform(-1, 1, half))
  b_bar = rng.normal(size=(half, width)) + 1j * rng.normal(size=(half, width))
  c_tilde = rng.normal(size=(width, 2 * half)) + 1j * rng.normal(size=(width, 2 * half))
  u = rng.normal(size=(batch, length, width))
  reset = rng.random((batch, length)) < 0.1
  reset[:, [8, 16, 23]] = True
  with jax.enable_x64(True):
    def values_and_gradients(lambda_bar, b_bar, c_tilde, u, split):
      def loss(lambda_bar, b_bar, c_tilde, u):
        y = ssm.apply_ssm(lambda_bar, b_bar, c_tilde, u, conj_sym=True, bidirectional=True,
                          reset=jnp.asarray(reset), impl="chunked",
                          sharding=SPEC if split else None)
        return jnp.sum(jnp.sin(y))
      return loss(lambda_bar, b_bar, c_tilde, u), jax.grad(loss, argnums=(0, 1, 2, 3))(
          lambda_bar, b_bar, c_tilde, u)

    args = tuple(map(jnp.asarray, (lambda_bar, b_bar, c_tilde, u)))
    got = _jit_on(_mesh(context), functools.partial(values_and_gradients, split=True), *args)
    want = _jit_on(None, functools.partial(values_and_gradients, split=False), *args)
  for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), rtol=1e-10,
                               atol=1e-12)


# ----------------------------------------------------------------------------- the whole system

# The losses on meshes that split time against the 1-device run are in tests/test_mesh.py (S5) and
# tests/test_s4d_system.py (S4D), which share that run's reference with the other meshes.


def _collectives(hlo_text: str):
  """(kind, replica groups as a set of frozensets, or the group text when not listed) of every
  collective in an HLO module, in order."""
  found = []
  for line in hlo_text.splitlines():
    match = re.search(rf"\b({'|'.join(COLLECTIVES)})(?:-start)?\(", line)
    if not match or "=" not in line[:match.start()]:
      continue
    listed = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    groups = (frozenset(frozenset(map(int, g.split(","))) for g in re.findall(r"\{([\d,]+)\}",
                                                                               listed.group(1)))
              if listed else re.search(r"(?:replica_groups|source_target_pairs)=(\S+)",
                                       line).group(1))
    found.append((match.group(1), groups))
  return found


def _context_groups(mesh) -> frozenset:
  """The device groups that share everything but their position along `context`."""
  devices = np.vectorize(lambda d: d.id)(mesh.devices)
  along = np.moveaxis(devices, parallel.MESH_AXES.index("context"), -1)
  return frozenset(frozenset(group.tolist()) for group in along.reshape(-1, along.shape[-1]))


LAYERS = 3


def _context_config(**changes):
  # scan_layers=False: each layer's collectives appear once in the program, not in a layer loop.
  return tiny_config(mesh__data=2, mesh__context=4, model__num_layers=LAYERS,
                     model__scan_layers=False, **changes)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_forward_crosses_the_context_axis_once_per_layer(bidirectional):
  """One all-gather per layer; a bidirectional layer's two directions share it."""
  config = _context_config(model__bidirectional=bidirectional)
  mesh = parallel.make_mesh(config.mesh)
  model = S5Model.from_config(config.model)
  tokens = np.zeros((8, 128), np.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))
  shardings = parallel.logical_shardings(boxed, mesh)

  def forward(variables, tokens):
    with parallel.logical_constraints(mesh):
      return model.apply(variables, tokens)

  hlo = jax.jit(forward, in_shardings=(shardings, parallel.batch_sharding(mesh))).lower(
      parallel.with_shardings(nn.unbox(boxed), shardings),
      jax.ShapeDtypeStruct(tokens.shape, tokens.dtype)).compile().as_text()
  # Nothing else moves between devices: time is never gathered, H and P' are whole.
  assert _collectives(hlo) == [("all-gather", _context_groups(mesh))] * LAYERS
  # Each gather carries (directions, end state and transfer, S segments, rows, 2, P') numbers.
  directions, rows = 2 if bidirectional else 1, 8 // config.mesh.data
  shapes = re.findall(r"= \w+\[([\d,]+)\][^=]*\ball-gather(?:-start)?\(", hlo)
  assert shapes == [f"{directions},2,4,{rows},2,{config.model.ssm_size // 2}"] * LAYERS, shapes


@pytest.mark.parametrize("bidirectional", [False, True])
def test_train_step_gathers_once_per_layer_and_scatters_its_mirror_outside_time_loops(
    bidirectional):
  config = _context_config(model__bidirectional=bidirectional)
  mesh = parallel.make_mesh(config.mesh)
  length = 128
  sample = {"inputs": np.zeros((8, length), np.int32), "targets": np.zeros((8, length), np.int32),
            "mask": np.ones((8, length), np.float32), "reset": np.zeros((8, length), bool),
            "target_bytes": np.ones((8, length), np.int32)}
  model, optimizer, schedule, abstract_state, shardings = training.build_model_and_state(
      config, mesh, sample)
  hlo = training.jit_train_step(config, mesh, model, optimizer, schedule, shardings).lower(
      abstract_state, training.abstract_batch(sample, mesh)).compile().as_text()
  context = _context_groups(mesh)
  found = _collectives(hlo)
  assert found.count(("all-gather", context)) == LAYERS
  # The gather's transpose (the CPU backend may run a reduce-scatter as all-reduce + slice).
  assert (found.count(("reduce-scatter", context)) + found.count(("all-reduce", context))
          == LAYERS), found
  assert [kind for kind, _ in found].count("all-gather") == LAYERS, "time gathered somewhere"
  # No flag or halo crosses a segment boundary on its own (a bidirectional layer's reverse keep
  # is derived on each device), and nothing is re-laid out over context.
  assert not {"collective-permute", "all-to-all"} & {kind for kind, _ in found}, found
  computations = hlo_computations(hlo)
  loops = re.findall(r"while\(.*body=%?([\w.\-]+)", "\n".join(computations.values()))
  assert loops, "expected the time scans to compile to loops"
  for body in loops:
    inside = "\n".join(computations[c] for c in reachable(computations, body))
    assert not _collectives(inside), f"collective inside loop {body}"


# ----------------------------------------------------------------------------- S4D

@pytest.mark.parametrize("context,length,bidirectional", [
    (4, 64, False),     # one chunk of 16 per segment
    (2, 96, True),      # three chunks per segment, both directions
    (8, 256, False),
])
def test_s4d_split_over_context_equals_the_unsplit_convolution(context, length, bidirectional):
  rng = np.random.default_rng(length)
  channels, half_states = 4, 4
  lambda_ = np.tile(s4d_oracle.lambda_init(2 * half_states, "legs"), (channels, 1))
  c_shape = ((2,) if bidirectional else ()) + lambda_.shape
  c = rng.normal(size=c_shape) + 1j * rng.normal(size=c_shape)
  log_step = rng.uniform(np.log(1e-2), np.log(1e-1), channels)
  u = rng.normal(size=(ROWS, length, channels))
  with jax.enable_x64(True):
    system = (jnp.asarray(lambda_), jnp.asarray(c), jnp.asarray(log_step))
    u = jnp.asarray(u)

    def split(u):  # s4d_conv itself takes the chunked form when its sharding splits time
      return ssm.s4d_conv(*system, u, bidirectional=bidirectional, sharding=SPEC)

    got = np.asarray(_jit_on(_mesh(context), split, u))
    want = np.asarray(ssm.s4d_conv(*system, u, bidirectional=bidirectional))
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.max(np.abs(want)))


# ----------------------------------------------------------------------------- config

def test_context_size_that_does_not_fit_the_devices_is_a_config_error_naming_it():
  config = tiny_config(mesh__data=1, mesh__context=3)
  with pytest.raises(config_check.ConfigError, match="mesh.context"):
    config_check.check_on_devices(config, jax.devices(), 1)
  config.mesh.data, config.mesh.context = -1, 4
  config_check.check_on_devices(config, jax.devices(), 1)   # data fills in 2
  assert parallel.mesh_shape(config.mesh, 8) == ((2, 4, 1, 1), (1, 1, 1, 1))
