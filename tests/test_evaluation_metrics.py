"""FVD, KVD and Inception Score against closed forms, float64 references and hand-made cases."""

import numpy as np
import pytest
import scipy.linalg

from vqvdm_jax.evaluation import metrics


def _random_rotation(rng, dim):
  q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
  return q * np.sign(np.diag(r))


def test_frechet_distance_matches_the_closed_form_for_commuting_covariances():
  # Σ₁ = Q diag(a) Qᵀ, Σ₂ = Q diag(b) Qᵀ: d² = ‖μ₁ − μ₂‖² + Σ (√aᵢ − √bᵢ)².
  rng = np.random.default_rng(0)
  dim = 16
  rotation = _random_rotation(rng, dim)
  a, b = rng.uniform(0.1, 4.0, dim), rng.uniform(0.1, 4.0, dim)
  mu_1, mu_2 = rng.normal(size=dim), rng.normal(size=dim)
  sigma_1, sigma_2 = (rotation * a) @ rotation.T, (rotation * b) @ rotation.T
  expected = np.sum((mu_1 - mu_2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert metrics.frechet_distance(mu_1, sigma_1, mu_2, sigma_2) == pytest.approx(expected,
                                                                                 rel=1e-10)


def test_frechet_distance_matches_a_float64_sqrtm_reference():
  rng = np.random.default_rng(1)
  dim = 24
  factors = [rng.normal(size=(dim, 2 * dim)) for _ in range(2)]
  sigma_1, sigma_2 = (f @ f.T / (2 * dim) for f in factors)
  mu_1, mu_2 = rng.normal(size=dim), rng.normal(size=dim)
  root = scipy.linalg.sqrtm(sigma_1 @ sigma_2).real
  expected = np.sum((mu_1 - mu_2) ** 2) + np.trace(sigma_1 + sigma_2 - 2 * root)
  assert metrics.frechet_distance(mu_1, sigma_1, mu_2, sigma_2) == pytest.approx(expected,
                                                                                 rel=1e-9)


def test_fvd_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(64, 400)).astype(np.float32)  # N < D: rank-deficient covariance
  assert metrics.frechet_video_distance(features, features) == pytest.approx(0.0, abs=1e-6)
  distances = [metrics.frechet_video_distance(features, features + shift)
               for shift in (0.1, 0.5, 1.0)]
  # A constant shift c moves only the mean: d² = D c².
  np.testing.assert_allclose(distances, [400 * 0.01, 400 * 0.25, 400 * 1.0], rtol=1e-4)


def test_kvd_is_close_to_zero_for_two_samples_of_one_distribution():
  rng = np.random.default_rng(3)
  same = [metrics.kernel_distance(rng.normal(size=(200, 32)), rng.normal(size=(200, 32)))
          for _ in range(20)]
  shifted = metrics.kernel_distance(rng.normal(size=(200, 32)),
                                    rng.normal(size=(200, 32)) + 0.5)
  # Unbiased: the estimates scatter around 0 (some negative), far below a real difference.
  assert abs(np.mean(same)) < 0.02 * shifted
  assert min(same) < 0 < shifted


def test_kvd_of_a_hand_made_case():
  # k(x, y) = (xᵀy / d + 1)³: k(1, 1) = k(−1, −1) = 8, k(1, −1) = 0, so MMD² = 8 + 8 − 0.
  ones = np.ones((2, 2))
  assert metrics.kernel_distance(ones, -ones) == pytest.approx(16.0)
  # Off-diagonal terms only: X = {0, 1}, Y = {0, 2}: 1 + 1 − 2 (1 + 1 + 1 + 27) / 4 = −13.
  assert metrics.kernel_distance(np.array([[0.0], [1.0]]),
                                 np.array([[0.0], [2.0]])) == pytest.approx(-13.0)


def test_inception_score_of_uniform_predictions_is_one():
  mean, std = metrics.inception_score(np.full((100, 7), 1 / 7))
  assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
  num_classes = 5
  probabilities = np.eye(num_classes)[np.arange(200) % num_classes]
  mean, std = metrics.inception_score(probabilities, num_splits=10)
  assert mean == pytest.approx(num_classes) and std == pytest.approx(0.0, abs=1e-9)
  assert metrics.inception_score(np.eye(num_classes)[np.zeros(200, int)])[0] == pytest.approx(1.0)
