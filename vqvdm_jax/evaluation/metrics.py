"""Distribution metrics of generated videos, on features in float64 numpy: FVD, KVD, IS.

- Fréchet distance (FVD, Unterthiner et al. 2018, on I3D logits; FID's formula, Heusel et al.
  2017): ‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2}).
- Kernel distance (KVD, the video analogue of KID, Bińkowski et al. 2018): the unbiased MMD²
  with the polynomial kernel k(x, y) = (xᵀy / d + 1)³.
- Inception Score (Salimans et al. 2016; C3D for video, Saito et al. 2017):
  exp(E_x KL(p(y|x) ‖ p(y))), mean and standard deviation over splits.

Features are small (N x 400), so these run on the host in float64, where the matrix square root
of a nearly singular covariance is still accurate.
"""

from __future__ import annotations

import numpy as np


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``features [N, D]``, in float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"Need features of shape [N >= 2, D], got {features.shape}.")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix; round-off negatives clipped to 0."""
  eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
  return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def trace_sqrt_product(sigma_1: np.ndarray, sigma_2: np.ndarray) -> float:
  """tr((Σ₁ Σ₂)^{1/2}) for PSD Σ₁, Σ₂, without the unstable square root of a non-symmetric matrix.

  Σ₁Σ₂ is similar to the symmetric PSD matrix Σ₁^{1/2} Σ₂ Σ₁^{1/2} (conjugate by Σ₁^{1/2}), so
  both have the same non-negative eigenvalues λᵢ and the trace is Σ √λᵢ. Two symmetric
  eigendecompositions replace ``scipy.linalg.sqrtm``'s Schur form, which returns complex
  values and loses accuracy when the covariances are rank-deficient (N < D).
  """
  root_1 = _psd_sqrt(sigma_1)
  middle = root_1 @ sigma_2 @ root_1
  eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)
  return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu_1: np.ndarray, sigma_1: np.ndarray, mu_2: np.ndarray,
                     sigma_2: np.ndarray) -> float:
  """Fréchet (2-Wasserstein) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂), in float64.

  d² = ‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2 tr((Σ₁Σ₂)^{1/2}); FVD reports d², as FID does.
  """
  mu_1, mu_2 = np.asarray(mu_1, np.float64), np.asarray(mu_2, np.float64)
  sigma_1, sigma_2 = np.asarray(sigma_1, np.float64), np.asarray(sigma_2, np.float64)
  if mu_1.shape != mu_2.shape or sigma_1.shape != sigma_2.shape:
    raise ValueError(f"Statistics differ in shape: means {mu_1.shape} vs {mu_2.shape}, "
                     f"covariances {sigma_1.shape} vs {sigma_2.shape}.")
  mean_term = float(np.sum(np.square(mu_1 - mu_2)))
  trace_term = float(np.trace(sigma_1) + np.trace(sigma_2))
  # Round-off can push an exact 0 (identical statistics) a hair below zero.
  return max(0.0, mean_term + trace_term - 2.0 * trace_sqrt_product(sigma_1, sigma_2))


def frechet_video_distance(real_features: np.ndarray, fake_features: np.ndarray) -> float:
  """FVD from I3D features ``[N, 400]`` of real and generated clips."""
  return frechet_distance(*gaussian_statistics(real_features),
                          *gaussian_statistics(fake_features))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3) -> np.ndarray:
  """k(x, y) = (xᵀy / d + 1)^degree for rows of ``x [N, D]`` and ``y [M, D]``: ``[N, M]``.

  KID's kernel (Bińkowski et al. 2018): γ = 1 / d, coefficient 1.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return (x @ y.T / x.shape[1] + 1.0) ** degree


def kernel_distance(real_features: np.ndarray, fake_features: np.ndarray,
                    degree: int = 3) -> float:
  """Unbiased MMD² between two feature sets with the polynomial kernel (KID / KVD).

  MMD²ᵤ = Σ_{i≠j} k(xᵢ, xⱼ) / (m(m−1)) + Σ_{i≠j} k(yᵢ, yⱼ) / (n(n−1)) − 2 Σ k(xᵢ, yⱼ) / (mn),
  on the whole sets (no subsets), unscaled; it can be slightly negative when the two sets
  come from one distribution.
  """
  m, n = len(real_features), len(fake_features)
  if m < 2 or n < 2:
    raise ValueError(f"The unbiased MMD needs at least 2 samples per set, got {m} and {n}.")
  k_xx = polynomial_kernel(real_features, real_features, degree)
  k_yy = polynomial_kernel(fake_features, fake_features, degree)
  k_xy = polynomial_kernel(real_features, fake_features, degree)
  within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
  within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
  return float(within_x + within_y - 2.0 * k_xy.mean())


def inception_score(probabilities: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
  """(mean, std) over ``num_splits`` equal splits of exp(E_x KL(p(y|x) ‖ p(y))).

  ``probabilities [N, K]`` are the classifier's p(y|x); p(y) is their mean within each split.
  Uniform predictions score 1; confident predictions spread evenly over K classes score K.
  """
  probabilities = np.asarray(probabilities, np.float64)
  if probabilities.ndim != 2 or len(probabilities) < num_splits:
    raise ValueError(f"Need probabilities [N >= num_splits={num_splits}, K], "
                     f"got {probabilities.shape}.")
  scores = []
  for split in np.array_split(probabilities, num_splits):
    marginal = split.mean(axis=0, keepdims=True)
    # 0 · log 0 = 0: confident classifiers output exact zeros.
    ratio = np.where(split > 0, split / np.where(marginal > 0, marginal, 1.0), 1.0)
    kl = np.sum(split * np.log(ratio), axis=1)
    scores.append(float(np.exp(kl.mean())))
  return float(np.mean(scores)), float(np.std(scores))
