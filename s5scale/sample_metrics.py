"""Sample-quality metrics of SaShiMi's SC09 protocol, as pure NumPy functions.

A classifier scores each clip: `probs` (N, K) are its class probabilities p(y|x), `features`
(N, D) its penultimate activations (the pooled features its linear head reads). Definitions:

  IS   exp E_x[KL(p(y|x) || p(y))], p(y) = E_x p(y|x)         (Salimans et al. 2016)
  mIS  exp E_{x,x'}[KL(p(y|x) || p(y|x'))], x, x' independent   (Gurumurthy et al. 2017)
  AM   KL(p_ref(y) || p(y)) + E_x[H(p(y|x))]                    (Zhou et al. 2018)
       p_ref(y): the classifier's mean prediction on real clips
  FID  |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))      (Heusel et al. 2017)

Beside them, silent_fraction: the share of clips with no sample louder than -40 dBFS. A sampler
stuck in silence earns a confident class (and so IS) from the classifier without saying a word.

Where SaShiMi's evaluation script (state-spaces/s4, sc09_classifier) estimates instead of computing
exactly, we take the exact value of the same expectation: its IS takes p(y) from one random half of
the clips and the KL over the other half, and its mIS averages 10,000 random pairs drawn with
replacement; here p(y) is the mean over all clips and mIS averages all N² ordered pairs (the
expectation that sampling with replacement estimates). Logs are natural; 0·log 0 = 0.
"""

import numpy as np
from scipy import linalg

# Clipping keeps log finite for a probability that underflowed to 0 in float32 softmax.
_TINY = 1e-12


def _as_probs(probs) -> np.ndarray:
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or probs.shape[0] == 0:
    raise ValueError(f"probs must be (N, K) with N >= 1, got shape {probs.shape}")
  return probs


def _xlogy(x, y):
  """x·log y with 0·log 0 = 0."""
  return np.where(x > 0, x * np.log(np.maximum(y, _TINY)), 0.0)


def mean_entropy(probs) -> float:
  """E_x[H(p(y|x))] in nats."""
  probs = _as_probs(probs)
  return float(-np.mean(np.sum(_xlogy(probs, probs), axis=1)))


def kl_divergence(p, q) -> np.ndarray:
  """KL(p || q) over the last axis, in nats; p and q broadcast."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  return np.sum(_xlogy(p, p) - _xlogy(p, q), axis=-1)


def inception_score(probs) -> float:
  """exp E_x[KL(p(y|x) || p(y))]: from 1 (every clip alike or unsure) to K (sure and balanced)."""
  probs = _as_probs(probs)
  return float(np.exp(np.mean(kl_divergence(probs, probs.mean(axis=0)))))


def modified_inception_score(probs) -> float:
  """exp of the mean KL(p(y|x_i) || p(y|x_j)) over all ordered pairs (i, j), i = j included.

  KL(p_i || p_j) = sum_y p_i log p_i - sum_y p_i log p_j: an (N, N) matrix product, so all pairs
  cost one matmul.
  """
  probs = _as_probs(probs)
  self_term = np.sum(_xlogy(probs, probs), axis=1)                    # (N,)
  cross = probs @ np.log(np.maximum(probs, _TINY)).T                  # (N, N): sum p_i log p_j
  return float(np.exp(np.mean(self_term[:, None] - cross)))


def am_score(probs, reference_probs) -> float:
  """KL(p_ref(y) || p(y)) + E_x[H(p(y|x))]: 0 is best (real-like class balance, sure clips)."""
  probs, reference_probs = _as_probs(probs), _as_probs(reference_probs)
  return float(kl_divergence(reference_probs.mean(axis=0), probs.mean(axis=0))
               + mean_entropy(probs))


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features must be (N, D) with N >= 2, got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mean_a, cov_a, mean_b, cov_b) -> float:
  """Fréchet distance between N(mean_a, cov_a) and N(mean_b, cov_b).

  A singular product (fewer clips than feature dimensions) can make sqrtm non-finite; as in the
  FID reference code, the diagonals then get 1e-6 and the root is taken again. The imaginary part
  sqrtm returns for a product with round-off is dropped.
  """
  mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
  cov_a, cov_b = np.atleast_2d(cov_a).astype(np.float64), np.atleast_2d(cov_b).astype(np.float64)
  root = linalg.sqrtm(cov_a @ cov_b)
  if not np.all(np.isfinite(root)):
    offset = 1e-6 * np.eye(cov_a.shape[0])
    root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
  root = np.real(root)
  difference = mean_a - mean_b
  return float(difference @ difference + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def fid(features, reference_features) -> float:
  """FID between two sets of penultimate features, (N, D) and (M, D)."""
  return frechet_distance(*gaussian_statistics(features), *gaussian_statistics(reference_features))


SILENCE_PEAK = 0.01  # -40 dBFS: spoken digits peak near 0.5; 8-bit mu-law's codes nearest 0, ±9e-5


def silent_fraction(clips, masks) -> float:
  """Share of clips (N, T) whose peak |sample| inside their mask (N, T) is below SILENCE_PEAK."""
  clips, masks = np.asarray(clips, np.float64), np.asarray(masks, bool)
  peaks = np.max(np.where(masks, np.abs(clips), 0.0), axis=1)
  return float(np.mean(peaks < SILENCE_PEAK))


def all_scores(probs, features, reference_probs, reference_features) -> dict:
  """The four figures of the protocol, plus num_samples, for one set of clips."""
  return {"is": inception_score(probs), "mis": modified_inception_score(probs),
          "am": am_score(probs, reference_probs), "fid": fid(features, reference_features),
          "num_samples": int(np.asarray(probs).shape[0])}
