"""Tests for vqgan_jax.metrics: pixel metrics, codebook statistics, FID/IS/KID/PR."""

import math

import numpy as np
import pytest
import scipy.linalg

from vqgan_jax import metrics


def _images(rng, shape):
  return rng.uniform(-1, 1, shape).astype(np.float32)


# ---------------------------------------------------------------- pixel metrics


def test_psnr_of_known_noise_level():
  rng = np.random.default_rng(0)
  x = _images(rng, (3, 16, 16, 3))
  delta = 0.1
  # +-delta noise has MSE exactly delta^2, so PSNR = 10 log10(2^2 / delta^2) = 26.0206 dB.
  y = x + delta * rng.choice([-1.0, 1.0], x.shape).astype(np.float32)
  expected = 10 * math.log10(4.0 / delta ** 2)
  per = np.asarray(metrics.psnr(x, y, per_image=True))
  assert per.shape == (3,)
  np.testing.assert_allclose(per, expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics.psnr(x, y)), expected, rtol=1e-5)
  # Range 2 on [-1, 1] is the same number as range 1 on [0, 1].
  np.testing.assert_allclose(float(metrics.psnr((x + 1) / 2, (y + 1) / 2, data_range=1.0)),
                             expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics.mse(x, y)), delta ** 2, rtol=1e-5)
  np.testing.assert_allclose(float(metrics.l1(x, y)), delta, rtol=1e-5)
  assert np.isinf(float(metrics.psnr(x, x)))


def test_psnr_is_mean_of_per_image_values():
  rng = np.random.default_rng(1)
  x = _images(rng, (2, 8, 8, 3))
  y = x.copy()
  y[0] += 0.1  # MSE 0.01 -> 26.02 dB
  y[1] += 0.01  # MSE 1e-4 -> 46.02 dB
  np.testing.assert_allclose(float(metrics.psnr(x, y)), (26.0206 + 46.0206) / 2, atol=1e-3)


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match="shape mismatch"):
    metrics.mse(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 5, 3)))


def test_ssim_identical_images_is_one():
  rng = np.random.default_rng(2)
  x = _images(rng, (2, 24, 24, 3))
  np.testing.assert_allclose(np.asarray(metrics.ssim(x, x, per_image=True)), 1.0, atol=1e-5)


def test_ssim_matches_skimage():
  skm = pytest.importorskip("skimage.metrics")
  rng = np.random.default_rng(3)
  # A smooth image plus a noisy, slightly shifted copy: SSIM well inside (0, 1).
  yy, xx = np.mgrid[0:32, 0:40] / 8.0
  base = np.stack([np.sin(xx + yy), np.cos(xx - yy), np.sin(2 * xx) * np.cos(yy)], -1)
  imgs_a = np.stack([base, _images(rng, (32, 40, 3))]).astype(np.float32)
  imgs_b = np.clip(imgs_a + 0.3 * rng.standard_normal(imgs_a.shape), -1, 1).astype(np.float32)
  ours = np.asarray(metrics.ssim(imgs_a, imgs_b, per_image=True))
  ref = [skm.structural_similarity((a + 1) / 2, (b + 1) / 2, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False, data_range=1, channel_axis=-1)
         for a, b in zip(imgs_a.astype(np.float64), imgs_b.astype(np.float64))]
  assert 0.05 < min(ref) < max(ref) < 0.95
  np.testing.assert_allclose(ours, ref, atol=1e-3)
  np.testing.assert_allclose(float(metrics.ssim(imgs_a, imgs_b)), np.mean(ref), atol=1e-3)


def test_ssim_rejects_images_smaller_than_window():
  with pytest.raises(ValueError, match="at least 11x11"):
    metrics.ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))


# ---------------------------------------------------------------- codebook


def test_codebook_statistics_hand_computed():
  # 8 codes, 4 used equally: usage 50 %, entropy log2(4) = 2 bits, perplexity 4.
  counts = np.bincount([0, 0, 1, 1, 2, 2, 3, 3], minlength=8)
  assert metrics.codebook_usage(counts) == pytest.approx(50.0)
  assert metrics.code_entropy(counts) == pytest.approx(2.0)
  assert metrics.code_perplexity(counts) == pytest.approx(4.0)
  # p = (1/2, 1/4, 1/4, 0): H = 0.5*1 + 2 * 0.25*2 = 1.5 bits, perplexity 2^1.5.
  counts = np.array([2, 1, 1, 0])
  assert metrics.codebook_usage(counts) == pytest.approx(75.0)
  assert metrics.code_entropy(counts) == pytest.approx(1.5)
  assert metrics.code_perplexity(counts) == pytest.approx(2 ** 1.5)
  # A single code: entropy 0, perplexity 1.
  assert metrics.code_entropy([0, 5, 0]) == 0.0
  assert metrics.code_perplexity([0, 5, 0]) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="all zero"):
    metrics.code_entropy(np.zeros(4))


def test_index_histogram_streams_batches():
  rng = np.random.default_rng(4)
  batches = [rng.integers(0, 16, size=s) for s in [(2, 4, 4), (3, 4, 4), (7,)]]
  hist = metrics.IndexHistogram(16)
  for b in batches:
    hist.update(b)
  expected = np.bincount(np.concatenate([b.ravel() for b in batches]), minlength=16)
  np.testing.assert_array_equal(hist.counts, expected)
  assert hist.total == expected.sum()
  assert hist.usage() == metrics.codebook_usage(expected)
  assert hist.perplexity() == pytest.approx(metrics.code_perplexity(expected))
  assert hist.entropy() == pytest.approx(metrics.code_entropy(expected))
  with pytest.raises(ValueError, match="out of range"):
    hist.update(np.array([16]))
  hist.reset()
  assert hist.total == 0


# ---------------------------------------------------------------- FID


def _stats(x):
  return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_against_direct_computation():
  rng = np.random.default_rng(5)
  a = rng.standard_normal((300, 12))
  b = rng.standard_normal((250, 12)) @ rng.standard_normal((12, 12)) * 0.5 + 0.3
  mu1, s1 = _stats(a)
  mu2, s2 = _stats(b)
  # Direct: tr sqrt(s1 s2) = sum of sqrt eigenvalues of the symmetric s1^1/2 s2 s1^1/2,
  # computed with eigh, i.e. without the sqrtm path used by the implementation.
  w, v = np.linalg.eigh(s1)
  r1 = (v * np.sqrt(np.maximum(w, 0))) @ v.T
  tr_covmean = np.sum(np.sqrt(np.maximum(np.linalg.eigvalsh(r1 @ s2 @ r1), 0)))
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert got == pytest.approx(expected, rel=1e-6)
  # And the textbook sqrtm form.
  direct = (np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2)
            - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
  assert got == pytest.approx(direct, rel=1e-6)


def test_frechet_distance_closed_form_and_identity():
  # Diagonal covariances: d^2 = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
  mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])
  expected = 9.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)
  rng = np.random.default_rng(6)
  mu, s = _stats(rng.standard_normal((100, 8)))
  assert abs(metrics.frechet_distance(mu, s, mu, s)) < 1e-8


def test_frechet_distance_singular_covariance_is_finite():
  rng = np.random.default_rng(7)
  # Fewer samples than dimensions: rank-deficient covariances.
  mu1, s1 = _stats(rng.standard_normal((5, 20)))
  mu2, s2 = _stats(rng.standard_normal((5, 20)) + 0.5)
  d = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert np.isfinite(d) and d > 0


def test_feature_stats_streaming_equals_numpy():
  rng = np.random.default_rng(8)
  # A large common offset is where the naive E[xx^T] - mu mu^T loses precision.
  feats = rng.standard_normal((103, 6)) * [1, 2, 3, 4, 5, 6] + 1000.0
  stats = metrics.FeatureStats()
  for chunk in np.split(feats, [1, 10, 40, 41, 90]):
    stats.update(chunk)
  mu, sigma = stats.stats()
  assert stats.n == 103
  np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-9)
  np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-6, atol=1e-6)


def test_stats_save_load_round_trip_and_errors(tmp_path):
  rng = np.random.default_rng(9)
  mu, sigma = _stats(rng.standard_normal((20, 4)))
  path = tmp_path / "ref.npz"
  metrics.save_stats(path, mu, sigma)
  mu2, sigma2 = metrics.load_stats(path)
  np.testing.assert_array_equal(mu, mu2)
  np.testing.assert_array_equal(sigma, sigma2)

  bad = tmp_path / "bad.npz"
  np.savez(bad, mu=mu)
  with pytest.raises(KeyError, match=r"bad\.npz.*sigma"):
    metrics.load_stats(bad)
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    metrics.load_stats(tmp_path / "nope.npz")
  pickled = tmp_path / "pickled.npz"
  np.savez(pickled, mu=np.array([object()], dtype=object), sigma=sigma)
  with pytest.raises(ValueError):  # allow_pickle=False refuses object arrays
    metrics.load_stats(pickled)


# ---------------------------------------------------------------- IS / KID / PR


def test_inception_score_uniform_and_one_hot():
  uniform = np.full((50, 10), 0.1)
  mean, std = metrics.inception_score(uniform, from_logits=False, splits=5)
  assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)
  # Confident and diverse: every split holds each of 10 classes equally -> IS = 10.
  one_hot = np.eye(10)[np.arange(100) % 10]
  mean, std = metrics.inception_score(one_hot, from_logits=False, splits=10)
  assert mean == pytest.approx(10.0) and std == pytest.approx(0.0, abs=1e-9)
  # The same through logits (softmax of 50 * one-hot is one-hot to ~1e-20).
  mean, _ = metrics.inception_score(50.0 * one_hot, from_logits=True, splits=10)
  assert mean == pytest.approx(10.0, rel=1e-6)


def test_inception_score_logits_equal_softmax_probs():
  rng = np.random.default_rng(10)
  logits = rng.standard_normal((40, 7)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  a = metrics.inception_score(logits, from_logits=True, splits=4)
  b = metrics.inception_score(probs, from_logits=False, splits=4)
  np.testing.assert_allclose(a, b, rtol=1e-9)
  assert a[0] > 1.0


def test_kid_identical_vs_shifted():
  rng = np.random.default_rng(11)
  real = rng.standard_normal((200, 32))
  same, _ = metrics.kid(real, real.copy(), num_subsets=10, subset_size=100)
  other, _ = metrics.kid(real, rng.standard_normal((200, 32)), num_subsets=10, subset_size=100)
  shifted, _ = metrics.kid(real, real + 1.0, num_subsets=10, subset_size=100)
  assert shifted > 0.5
  assert abs(same) < 0.02 * shifted and abs(other) < 0.02 * shifted


def test_kid_full_set_matches_formula():
  # subset_size >= n means every subset is the whole set: check the unbiased formula.
  rng = np.random.default_rng(12)
  x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)) + 0.5
  k = lambda a, b: (a @ b.T / 3 + 1) ** 3
  m = 6
  off = lambda g: g.sum() - np.trace(g)
  expected = (off(k(x, x)) + off(k(y, y))) / (m * (m - 1)) - 2 * k(x, y).mean()
  mean, std = metrics.kid(x, y, num_subsets=3, subset_size=1000)
  assert mean == pytest.approx(expected) and std == pytest.approx(0.0, abs=1e-12)


def test_precision_recall():
  rng = np.random.default_rng(13)
  real = rng.standard_normal((120, 16))
  assert metrics.precision_recall(real, real.copy(), batch_size=50) == (1.0, 1.0)
  far = metrics.precision_recall(real, real + 100.0)
  assert far == (0.0, 0.0)
  # Real = two far-apart clusters, fake = one of them (mode dropping):
  # precision 1, recall exactly 1/2, whatever the batch size.
  two_modes = np.concatenate([real[:60], real[60:] + 100.0])
  assert metrics.precision_recall(two_modes, real[:60], batch_size=7) == (1.0, 0.5)
  assert metrics.precision_recall(two_modes, real[:60], batch_size=1000) == (1.0, 0.5)


def test_knn_radii_hand_computed():
  # Points on a line at 0, 1, 3, 6, 10: 3rd-nearest-other distances are 6, 5, 3, 5, 9.
  pts = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
  np.testing.assert_allclose(metrics.knn_radii(pts, k=3, batch_size=2),
                             np.array([6, 5, 3, 5, 9]) ** 2)


def test_border_ratio_sees_a_fringe_the_mean_hides():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  even = x + 0.1                                        # the same error everywhere
  np.testing.assert_allclose(np.asarray(metrics.border_ratio(x, even)), 1.0, rtol=1e-4)
  fringe = x.copy()
  fringe[:, :, :1] += 0.5                               # a 1-pixel coloured left edge
  fringe[:, 2:-2, 2:-2] += 0.05
  ratio = np.asarray(metrics.border_ratio(x, fringe))
  # ring: 32 of its 240 pixels off by 0.5, the rest exact; inside: all off by 0.05
  np.testing.assert_allclose(ratio, (32 * 0.5 / 240) / 0.05, rtol=1e-4)
  assert float(metrics.l1(x, fringe)) < 0.07           # while the image-wide L1 stays low
  with pytest.raises(ValueError, match="no interior"):
    metrics.border_ratio(x[:, :4, :4], x[:, :4, :4])
