"""bfloat16 operands for S5's B̄ and C̃ GEMMs (model.compute_dtype=bfloat16): float32
accumulation and a float32 state, with outputs and gradients within bfloat16's rounding of the
float64 oracle.

Tolerance: a bfloat16 operand carries 8 significant bits (relative rounding 2^-9 ≈ 2e-3), so a
GEMM over random-signed terms is off by a few 1e-3 of its output's norm; 1e-2 leaves room for two
GEMMs in a row and bounds it well below the error of a wrong formula (order 1).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s5scale import ssm
from s5scale.nn.blocks import ResidualBlock
from tests import ssm_oracle as oracle

BF16_TOLERANCE = 1e-2
P, H, L = 8, 32, 24


def system(seed: int = 0):
  """Λ̄ (P,), B̄ (P, H), C̃ (H, P) complex128, D (H,), u (2, L, H) float64."""
  rng = np.random.default_rng(seed)
  lambda_bar = rng.uniform(0.8, 0.99, P) * np.exp(1j * rng.uniform(-np.pi, np.pi, P))
  b_bar = (rng.normal(size=(P, H)) + 1j * rng.normal(size=(P, H))) / np.sqrt(H)
  c_tilde = (rng.normal(size=(H, P)) + 1j * rng.normal(size=(H, P))) / np.sqrt(P)
  return lambda_bar, b_bar, c_tilde, rng.normal(size=H), rng.normal(size=(2, L, H))


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def apply(lambda_bar, b_bar, c_tilde, d, u, gemm_dtype):
  return ssm.apply_ssm(lambda_bar, b_bar, c_tilde, u, conj_sym=True, bidirectional=False, D=d,
                       impl="chunked", gemm_dtype=gemm_dtype)


def as_single(lambda_bar, b_bar, c_tilde, d, u):
  return (jnp.asarray(lambda_bar, jnp.complex64), jnp.asarray(b_bar, jnp.complex64),
          jnp.asarray(c_tilde, jnp.complex64), jnp.asarray(d, jnp.float32),
          jnp.asarray(u, jnp.float32))


def test_outputs_match_the_float64_loop_within_bfloat16_rounding():
  lambda_bar, b_bar, c_tilde, d, u = system()
  expected = oracle.ssm_loop(lambda_bar, b_bar, c_tilde, u, conj_sym=True, bidirectional=False,
                             d=d)
  single = as_single(lambda_bar, b_bar, c_tilde, d, u)
  bf16_error = relative_error(apply(*single, gemm_dtype=jnp.bfloat16), expected)
  f32_error = relative_error(apply(*single, gemm_dtype=None), expected)
  assert bf16_error < BF16_TOLERANCE, bf16_error
  # The bfloat16 path really rounds (otherwise the test above proves nothing), float32 does not.
  assert bf16_error > 1e-4 > f32_error * 10, (bf16_error, f32_error)


def test_gradients_match_float64_within_bfloat16_rounding():
  lambda_bar, b_bar, c_tilde, d, u = system(1)
  weights = np.random.default_rng(2).normal(size=(2, L, H))

  def loss(gemm_dtype):
    def weighted(b, c, inputs):
      return jnp.sum(apply(lambda_bar_arg, b, c, d_arg, inputs, gemm_dtype) * weights_arg)
    return jax.jit(jax.grad(weighted, argnums=(0, 1, 2)))

  with jax.enable_x64(True):  # the oracle: the same sum's gradient in float64 arithmetic
    lambda_bar_arg, d_arg, weights_arg = jnp.asarray(lambda_bar), jnp.asarray(d), weights
    expected = loss(None)(jnp.asarray(b_bar), jnp.asarray(c_tilde), jnp.asarray(u))
  lambda_bar_arg, b32, c32, d_arg, u32 = as_single(lambda_bar, b_bar, c_tilde, d, u)
  weights_arg = jnp.asarray(weights, jnp.float32)
  actual = loss(jnp.bfloat16)(b32, c32, u32)
  for name, got, want in zip(("B", "C", "u"), actual, expected):
    assert got.dtype == (jnp.float32 if name == "u" else jnp.complex64), (name, got.dtype)
    error = relative_error(jnp.stack([got.real, got.imag]) if name != "u" else got,
                           np.stack([want.real, want.imag]) if name != "u" else want)
    assert 1e-4 < error < BF16_TOLERANCE, (name, error)


def dot_signatures(lowered_text: str) -> list[tuple[str, str, str]]:
  """(lhs element type, rhs element type, result element type) of each dot_general."""
  pattern = r"stablehlo\.dot_general.*?: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> " \
            r"tensor<[^>]*x(\w+)>"
  return re.findall(pattern, lowered_text)


def tpu_program(function, *args) -> str:
  """StableHLO of function(*args) as lowered for TPU (jax.export: no TPU or libtpu needed)."""
  return jax.export.export(jax.jit(function), platforms=["tpu"])(*args).mlir_module()


def test_every_projection_gemm_takes_bfloat16_operands_and_accumulates_in_float32():
  single = as_single(*system())

  def loss(b, c, u):
    return jnp.sum(apply(single[0], b, c, single[3], u, jnp.bfloat16) ** 2)

  text = tpu_program(jax.grad(loss, argnums=(0, 1, 2)), *single[1:3], single[4])
  # Forward B̄u and C̃x, and the two gradients of each.
  assert dot_signatures(text) == [("bf16", "bf16", "f32")] * 6
  # The recurrence reads B̄u in float32: its state is never rounded to bfloat16.
  bu = ssm.s5.project_input_planar(single[1], single[4], jnp.bfloat16)
  assert bu.dtype == jnp.float32


@pytest.mark.parametrize("compute_dtype, expected", [(jnp.bfloat16, "bf16"), (jnp.float32, "f32")])
def test_the_s5_block_runs_its_projections_in_compute_dtype(compute_dtype, expected):
  block = ResidualBlock(d_model=H, ssm_kwargs=dict(ssm_size=2 * P, scan_impl="chunked"),
                        activation="gelu", compute_dtype=compute_dtype)
  x = jnp.ones((2, L, H), jnp.float32)
  params = block.init(jax.random.PRNGKey(0), x, None, None)
  text = tpu_program(lambda p: block.apply(p, x, None, None)[0], params)
  # B̄'s planar matrix is (H, 2, P'): the GEMM that reads it has operands in compute_dtype.
  b_gemm = re.findall(rf"\(tensor<{2 * L}x{H}x(\w+)>, tensor<{H}x2x{P}x(\w+)>\)", text)
  assert b_gemm == [(expected, expected)], b_gemm
