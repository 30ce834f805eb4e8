"""HiPPO-N initialisation of the diagonal state matrix (S5 paper, §4 and App. B).

Pure NumPy: initialisation runs once on the host, in float64, before anything is traced.
"""

import numpy as np
import scipy.linalg


def make_hippo_legs(n: int) -> np.ndarray:
  """HiPPO-LegS matrix A, (n, n) float64.

  A_nk = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) for n = k, 0 above the diagonal.
  """
  scale = np.sqrt(1 + 2 * np.arange(n))
  a = np.tril(scale[:, None] * scale[None, :]) - np.diag(np.arange(n))
  return -a


def make_dplr_hippo(n: int) -> tuple[np.ndarray, np.ndarray]:
  """Diagonalises the normal part of HiPPO-LegS (HiPPO-N).

  S = A + p pᵀ with p_n = sqrt(n + 1/2) is normal, so S = V Λ V⁻¹ with V unitary.

  Returns:
    Lambda: (n,) complex128, real parts all equal mean(diag S) = -1/2.
    V: (n, n) complex128 unitary eigenvectors, columns in `eigh` order (ascending imaginary part).
  """
  p = np.sqrt(np.arange(n) + 0.5)
  normal_part = make_hippo_legs(n) + p[:, None] * p[None, :]
  # S = -1/2 I + skew-symmetric; -iS is Hermitian, so eigh gives the imaginary parts stably.
  lambda_real = np.mean(np.diagonal(normal_part)) * np.ones(n)
  lambda_imag, v = np.linalg.eigh(normal_part * -1j)
  return lambda_real + 1j * lambda_imag, v


def make_block_hippo(ssm_size: int, blocks: int, conj_sym: bool):
  """Block-diagonal HiPPO-N with `blocks` copies of a (ssm_size/blocks)-state block.

  With conj_sym, each block keeps the first half of its eigenvalues (in `eigh` order these are
  the negative-imaginary half; the rest are their conjugates), so the layer carries P' = P/2
  complex states.

  Returns:
    Lambda: (P',) complex128.
    V: (P, P') complex128 block-diagonal eigenvectors.
    Vinv: (P', P) complex128, V^H per block.
  """
  validate_state_sizes(ssm_size, blocks, conj_sym)
  block_size = ssm_size // blocks
  lambda_block, v_block = make_dplr_hippo(block_size)
  kept = block_size // 2 if conj_sym else block_size
  lambda_block, v_block = lambda_block[:kept], v_block[:, :kept]
  lambda_all = np.tile(lambda_block, blocks)
  v = scipy.linalg.block_diag(*([v_block] * blocks))
  vinv = scipy.linalg.block_diag(*([v_block.conj().T] * blocks))
  return lambda_all, v, vinv


def validate_state_sizes(ssm_size: int, blocks: int, conj_sym: bool) -> None:
  if ssm_size <= 0:
    raise ValueError(f"ssm_size must be positive, got {ssm_size}")
  if blocks <= 0 or ssm_size % blocks:
    raise ValueError(f"ssm_size={ssm_size} is not divisible by blocks={blocks}")
  if conj_sym and ssm_size % 2:
    raise ValueError(f"ssm_size={ssm_size} must be even with conj_sym (states come in conjugate pairs)")
  if conj_sym and (ssm_size // blocks) % 2:
    raise ValueError(
        f"ssm_size/blocks = {ssm_size}/{blocks} must be even with conj_sym: each block keeps half "
        "of its conjugate-pair eigenvalues")
