"""Time split across devices (the mesh's `context` axis): each device scans its segment from a
zero state, one all-gather hands the end states on (s5scale/ssm/context_parallel.py).

Oracles: the float64 NumPy loop of the recurrence (tests/ssm_oracle.py), the same scan run
unsplit on one device (values and gradients, float64, rtol 1e-10), the unsplit S4D convolution,
the losses of a 1-device run, and the collectives in the compiled HLO.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from s5scale.ssm import recurrence
from tests import helpers
from tests.helpers import tiny_config, train_in_process
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
    (4, 24, False, (6, 12, 13), True),       # ... and the boundary seen from the other side
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


# ----------------------------------------------------------------------------- the whole system

# (data, fsdp, model, context) on 8 devices; (1, 1, 1, 1) runs in a 1-device process.
CONTEXT_MESHES_ON_8 = [(2, 1, 1, 4), (1, 2, 1, 4), (1, 1, 2, 4)]


def _mesh_changes(mesh):
  return dict(zip(("mesh__data", "mesh__fsdp", "mesh__model", "mesh__context"), mesh))


def test_same_losses_with_time_split_over_context(tmp_path):
  single = helpers.run("train", "text_small.py", tmp_path / "1x1x1x1",
                       helpers.overrides(train__num_steps=3, checkpoint__every_steps=100),
                       devices=1)
  assert single.returncode == 0, single.stderr[-3000:]
  reference = helpers.losses(tmp_path / "1x1x1x1")
  assert sorted(reference) == [1, 2, 3]
  for mesh in CONTEXT_MESHES_ON_8:
    config = tiny_config(train__num_steps=3, checkpoint__every_steps=100, **_mesh_changes(mesh))
    losses = train_in_process(config, tmp_path / "x".join(map(str, mesh)))
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [reference[s] for s in (1, 2, 3)],
                               rtol=1e-5, err_msg=f"mesh {mesh}")
