"""Evaluation metrics for VQGAN reconstructions and samples.

Three families, all plain functions on arrays (no model state):

* Pixel metrics on images in [-1, 1], NHWC: `mse`, `l1`, `psnr`, `ssim`. These use
  `jax.numpy`, so they can be jitted and run on device next to the model; they accept
  numpy arrays too. `per_image=True` returns one value per image, otherwise the mean.
* Codebook statistics from code-index counts: `codebook_usage`, `code_perplexity`,
  `code_entropy`, and the streaming `IndexHistogram`.
* Feature-space metrics on Inception features (see `vqgan_jax.models.inception`):
  `frechet_distance` (FID) with the streaming `FeatureStats` accumulator and
  `save_stats`/`load_stats` for reference statistics, `inception_score`, `kid`
  (kernel inception distance) and `precision_recall` (Kynkaanniemi et al. 2019).
  These run on the host in numpy, float64 where accuracy matters, because they are
  reductions over a whole evaluation set rather than per-batch device work.
"""

import math
import os
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special

ArrayLike = Union[np.ndarray, jax.Array]
PathLike = Union[str, os.PathLike]

# ----------------------------------------------------------------------------------
# Pixel metrics
# ----------------------------------------------------------------------------------


def _check_pair(x: ArrayLike, y: ArrayLike) -> Tuple[jax.Array, jax.Array]:
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  if x.shape != y.shape:
    raise ValueError(f"shape mismatch: {x.shape} vs {y.shape}")
  if x.ndim != 4:
    raise ValueError(f"expected NHWC images (4 dims), got shape {x.shape}")
  return x, y


def _reduce(per_image: jax.Array, keep: bool) -> jax.Array:
  return per_image if keep else jnp.mean(per_image)


def mse(x: ArrayLike, y: ArrayLike, per_image: bool = False) -> jax.Array:
  """Mean squared error over H, W, C; shape (B,) if `per_image` else a scalar mean."""
  x, y = _check_pair(x, y)
  return _reduce(jnp.mean(jnp.square(x - y), axis=(1, 2, 3)), per_image)


def l1(x: ArrayLike, y: ArrayLike, per_image: bool = False) -> jax.Array:
  """Mean absolute error over H, W, C; shape (B,) if `per_image` else a scalar mean."""
  x, y = _check_pair(x, y)
  return _reduce(jnp.mean(jnp.abs(x - y), axis=(1, 2, 3)), per_image)


def psnr(x: ArrayLike, y: ArrayLike, data_range: float = 2.0,
         per_image: bool = False) -> jax.Array:
  """Peak signal-to-noise ratio in dB, 10 * log10(data_range**2 / MSE).

  The default `data_range=2.0` is for images in [-1, 1] (it gives the same number as
  PSNR of the images mapped to [0, 1] with range 1). PSNR is computed per image and
  then averaged (the usual convention; the PSNR of the pooled MSE would weight bad
  images less). Identical images give +inf.
  """
  per = 10.0 * jnp.log10(data_range ** 2 / mse(x, y, per_image=True))
  return _reduce(per, per_image)


def border_ratio(x: ArrayLike, y: ArrayLike, width: int = 2) -> jax.Array:
  """Per image: mean |x - y| on the outer `width`-pixel ring over the mean on the rest.

  About 1 for an error spread evenly over the image; well above 1 when reconstructions
  go wrong at their borders (a coloured fringe), which the image-wide L1 hides: a 2-pixel
  ring is 23% of a 32x32 crop. Images (B, H, W, C), H and W > 2 * width.
  """
  x, y = _check_pair(x, y)
  h, w = x.shape[1:3]
  if min(h, w) <= 2 * width:
    raise ValueError(f"border_ratio: images of {h}x{w} have no interior inside a "
                     f"{width}-pixel ring")
  err = jnp.mean(jnp.abs(x - y), axis=-1)                       # (B, H, W)
  inner = jnp.zeros((h, w), bool).at[width:h - width, width:w - width].set(True)
  ring_mean = jnp.sum(jnp.where(inner, 0.0, err), axis=(1, 2)) / jnp.sum(~inner)
  inner_mean = jnp.sum(jnp.where(inner, err, 0.0), axis=(1, 2)) / jnp.sum(inner)
  return ring_mean / jnp.maximum(inner_mean, 1e-8)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
  r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  w = np.exp(-0.5 * (r / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


def ssim(x: ArrayLike, y: ArrayLike, per_image: bool = False, win_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Structural similarity of images in [-1, 1] (NHWC), computed on [0, 1] scale.

  Matches `skimage.metrics.structural_similarity(a, b, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)` on the
  images mapped to [0, 1]: an 11-tap Gaussian window (sigma 1.5, skimage's truncate
  3.5 gives the same 11 taps), population (biased) local variances, C1 = (K1)^2 and
  C2 = (K2)^2, the SSIM map averaged over the valid interior and then over channels.

  skimage filters with reflect padding and then crops (win_size - 1) // 2 pixels from
  every border before averaging; every pixel that survives the crop has its whole
  window inside the image, so a 'VALID' convolution gives exactly the same numbers
  without any padding. Images must be at least `win_size` pixels on each side.
  """
  x, y = _check_pair(x, y)
  b, h, w, c = x.shape
  if h < win_size or w < win_size:
    raise ValueError(f"ssim needs images of at least {win_size}x{win_size}, got {h}x{w}")
  # Inputs are in [-1, 1]; the metric is defined on data range 1.
  x = (x + 1.0) / 2.0
  y = (y + 1.0) / 2.0
  g = jnp.asarray(_gaussian_window(win_size, sigma))

  def blur(z):
    # Separable Gaussian, applied per channel: fold channels into the batch.
    z = jnp.transpose(z, (0, 3, 1, 2)).reshape(b * c, h, w, 1)
    kh = g.reshape(win_size, 1, 1, 1)
    kw = g.reshape(1, win_size, 1, 1)
    dn = ("NHWC", "HWIO", "NHWC")
    prec = jax.lax.Precision.HIGHEST
    z = jax.lax.conv_general_dilated(z, kh, (1, 1), "VALID", dimension_numbers=dn,
                                     precision=prec)
    z = jax.lax.conv_general_dilated(z, kw, (1, 1), "VALID", dimension_numbers=dn,
                                     precision=prec)
    return z.reshape(b, c, h - win_size + 1, w - win_size + 1)

  ux, uy = blur(x), blur(y)
  vx = blur(x * x) - ux * ux
  vy = blur(y * y) - uy * uy
  vxy = blur(x * y) - ux * uy
  c1 = k1 ** 2
  c2 = k2 ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  # Mean over the map per channel, then over channels (skimage's channel_axis mode).
  return _reduce(jnp.mean(s, axis=(1, 2, 3)), per_image)


# ----------------------------------------------------------------------------------
# Codebook statistics
# ----------------------------------------------------------------------------------


def _probs_from_counts(counts: ArrayLike) -> np.ndarray:
  counts = np.asarray(counts, dtype=np.float64)
  if counts.ndim != 1:
    raise ValueError(f"counts must be 1-D (one entry per code), got shape {counts.shape}")
  if np.any(counts < 0):
    raise ValueError("counts must be non-negative")
  total = counts.sum()
  if total <= 0:
    raise ValueError("counts are all zero: no indices were recorded")
  return counts / total


def codebook_usage(counts: ArrayLike) -> float:
  """Percentage (0-100) of codebook entries used at least once."""
  counts = np.asarray(counts)
  if counts.ndim != 1 or counts.size == 0:
    raise ValueError(f"counts must be a non-empty 1-D array, got shape {counts.shape}")
  return float(100.0 * np.count_nonzero(counts > 0) / counts.size)


def code_entropy(counts: ArrayLike) -> float:
  """Entropy in bits of the empirical code distribution (0 log 0 taken as 0)."""
  p = _probs_from_counts(counts)
  p = p[p > 0]
  return float(-np.sum(p * np.log2(p)))


def code_perplexity(counts: ArrayLike) -> float:
  """exp(entropy) of the empirical code distribution: the effective number of codes.

  Equals the number of codes when usage is uniform, 1 when a single code is used.
  """
  return float(2.0 ** code_entropy(counts))


def code_statistics(counts: ArrayLike, prefix: str = "") -> dict:
  """{prefix}codebook_usage (% of codes hit) and {prefix}code_perplexity of code counts."""
  counts = np.asarray(counts, np.float64)
  if counts.sum() <= 0:
    return {f"{prefix}codebook_usage": 0.0, f"{prefix}code_perplexity": 0.0}
  return {f"{prefix}codebook_usage": codebook_usage(counts),
          f"{prefix}code_perplexity": code_perplexity(counts)}


def unigram_cross_entropy_bits(train_counts: ArrayLike, val_counts: ArrayLike,
                               alpha: float = 0.5) -> float:
  """Bits per val token of a unigram model fitted on train counts (add-alpha smoothing):
  the baseline a stage-2 model's val bits per token must beat."""
  train_counts = np.asarray(train_counts, np.float64) + alpha
  q = train_counts / train_counts.sum()
  val_counts = np.asarray(val_counts, np.float64)
  return float(-(val_counts * np.log2(q)).sum() / max(val_counts.sum(), 1.0))


class IndexHistogram:
  """Streaming histogram of code indices (np.bincount over batches).

  >>> h = IndexHistogram(num_codes=1024)
  >>> h.update(indices)            # any shape of integer indices in [0, num_codes)
  >>> h.usage(), h.perplexity(), h.entropy()
  """

  def __init__(self, num_codes: int):
    if num_codes <= 0:
      raise ValueError(f"num_codes must be positive, got {num_codes}")
    self.num_codes = int(num_codes)
    self.counts = np.zeros(self.num_codes, dtype=np.int64)

  def update(self, indices: ArrayLike) -> "IndexHistogram":
    idx = np.asarray(indices).ravel()
    if idx.size == 0:
      return self
    if not np.issubdtype(idx.dtype, np.integer):
      raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= self.num_codes:
      raise ValueError(f"indices out of range [0, {self.num_codes}): min {lo}, max {hi}")
    self.counts += np.bincount(idx, minlength=self.num_codes)
    return self

  def reset(self) -> None:
    self.counts[:] = 0

  @property
  def total(self) -> int:
    return int(self.counts.sum())

  def usage(self) -> float:
    return codebook_usage(self.counts)

  def perplexity(self) -> float:
    return code_perplexity(self.counts)

  def entropy(self) -> float:
    return code_entropy(self.counts)


# ----------------------------------------------------------------------------------
# Frechet distance (FID) and feature statistics
# ----------------------------------------------------------------------------------


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike,
                     sigma2: ArrayLike, eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2)).

  Numerics follow the usual FID practice: the matrix square root is taken with
  `scipy.linalg.sqrtm` in float64; if the product is (near-)singular and the root
  comes out non-finite, `eps` is added to both diagonals and the root retried. Small
  imaginary parts from round-off are discarded; a large one (> 1e-3 on the diagonal)
  means the inputs are not valid covariances and raises.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors have different shapes: {mu1.shape} vs {mu2.shape}")
  d = mu1.shape[0]
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")

  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    offset = np.eye(d) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    max_imag = np.max(np.abs(np.diagonal(covmean).imag))
    if max_imag > 1e-3:
      raise ValueError(f"sqrtm(sigma1 @ sigma2) has a large imaginary part ({max_imag:.3g}); "
                       "are both inputs positive semi-definite covariances?")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class FeatureStats:
  """Streaming mean and covariance of feature vectors, in float64.

  Batches are merged with the pairwise (Chan et al.) update of the mean and of the
  centred scatter matrix, which avoids the cancellation of the naive
  E[xx^T] - mu mu^T when features have a large mean. `covariance()` uses the unbiased
  (n - 1) normalisation, like `np.cov(features, rowvar=False)`.
  """

  def __init__(self, dim: Optional[int] = None):
    self.dim = dim
    self.n = 0
    self._mean = None
    self._scatter = None  # sum over samples of (x - mean)(x - mean)^T

  def update(self, features: ArrayLike) -> "FeatureStats":
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
      raise ValueError(f"features must be (batch, dim), got shape {f.shape}")
    if self.dim is None:
      self.dim = f.shape[1]
    if f.shape[1] != self.dim:
      raise ValueError(f"feature dim {f.shape[1]} does not match {self.dim}")
    nb = f.shape[0]
    if nb == 0:
      return self
    mb = f.mean(axis=0)
    centred = f - mb
    sb = centred.T @ centred
    if self.n == 0:
      self._mean, self._scatter, self.n = mb, sb, nb
      return self
    n = self.n + nb
    delta = mb - self._mean
    self._mean = self._mean + delta * (nb / n)
    self._scatter = self._scatter + sb + np.outer(delta, delta) * (self.n * nb / n)
    self.n = n
    return self

  def mean(self) -> np.ndarray:
    if self.n == 0:
      raise ValueError("FeatureStats is empty")
    return self._mean.copy()

  def covariance(self) -> np.ndarray:
    if self.n < 2:
      raise ValueError(f"covariance needs at least 2 samples, have {self.n}")
    return self._scatter / (self.n - 1)

  def stats(self) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma), ready for `frechet_distance` or `save_stats`."""
    return self.mean(), self.covariance()


def save_stats(path: PathLike, mu: ArrayLike, sigma: ArrayLike) -> None:
  """Write reference statistics as an .npz with keys 'mu' and 'sigma' (float64)."""
  mu = np.asarray(mu, dtype=np.float64)
  sigma = np.asarray(sigma, dtype=np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"expected mu (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
  with open(path, "wb") as f:  # a file object stops numpy from appending '.npz'
    np.savez(f, mu=mu, sigma=sigma)


def load_stats(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
  """Read (mu, sigma) written by `save_stats` (or pytorch-fid's --save-stats).

  Loads with allow_pickle=False so an untrusted file cannot run code.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"reference statistics file not found: {path}")
  with np.load(path, allow_pickle=False) as data:
    missing = [k for k in ("mu", "sigma") if k not in data.files]
    if missing:
      raise KeyError(f"{path}: missing key(s) {missing}; found {sorted(data.files)} "
                     "(expected 'mu' and 'sigma')")
    mu = np.asarray(data["mu"], dtype=np.float64)
    sigma = np.asarray(data["sigma"], dtype=np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{path}: expected mu (d,) and sigma (d, d), got {mu.shape} and "
                     f"{sigma.shape}")
  return mu, sigma


# ----------------------------------------------------------------------------------
# Inception score, KID, precision/recall
# ----------------------------------------------------------------------------------


def inception_score(scores: ArrayLike, *, from_logits: bool,
                    splits: int = 10) -> Tuple[float, float]:
  """Inception Score exp(E_x KL(p(y|x) || p(y))), as (mean, std) over `splits` parts.

  `scores` is (N, classes): classifier logits if `from_logits` (softmax applied here,
  in float64) or probabilities otherwise (rows renormalised to sum to 1). With the FID
  Inception network, pass all 1008 logits, as the original TF implementation did. The N
  samples are cut into `splits` contiguous parts of near-equal size (np.array_split,
  so no sample is dropped); p(y) is the mean prediction within each part.
  `from_logits` has no default because passing probabilities as logits (or the
  reverse) silently gives a wrong but plausible number.
  """
  s = np.asarray(scores, dtype=np.float64)
  if s.ndim != 2:
    raise ValueError(f"expected (N, classes), got shape {s.shape}")
  if not 1 <= splits <= s.shape[0]:
    raise ValueError(f"splits must be in [1, N={s.shape[0]}], got {splits}")
  if from_logits:
    p = np.exp(s - scipy.special.logsumexp(s, axis=1, keepdims=True))
  else:
    if np.any(s < 0):
      raise ValueError("probabilities must be non-negative (pass from_logits=True for logits)")
    p = s / s.sum(axis=1, keepdims=True)
  values = []
  for idx in np.array_split(np.arange(s.shape[0]), splits):
    p_part = p[idx]
    p_y = p_part.mean(axis=0, keepdims=True)
    # rel_entr(p, q) = p log(p / q) with the 0 log 0 = 0 convention.
    kl = scipy.special.rel_entr(p_part, p_y).sum(axis=1)
    values.append(math.exp(np.mean(kl)))
  return float(np.mean(values)), float(np.std(values))


def kid(features_real: ArrayLike, features_fake: ArrayLike, num_subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> Tuple[float, float]:
  """Kernel Inception Distance (Binkowski et al. 2018), as (mean, std) over subsets.

  Unbiased estimate of MMD^2 with the cubic polynomial kernel
  k(x, y) = (x . y / d + 1)^3, on `num_subsets` random subsets (without replacement)
  of m = min(subset_size, n_real, n_fake) samples from each set:
    MMD^2_u = sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (m (m-1))
              - 2 sum_{i,j} k(x_i, y_j) / m^2.
  The estimate is unbiased, so it can be slightly negative for matching sets.
  """
  xr = np.asarray(features_real, dtype=np.float64)
  xf = np.asarray(features_fake, dtype=np.float64)
  if xr.ndim != 2 or xf.ndim != 2 or xr.shape[1] != xf.shape[1]:
    raise ValueError(f"expected (n, d) feature arrays, got {xr.shape} and {xf.shape}")
  d = xr.shape[1]
  m = min(subset_size, xr.shape[0], xf.shape[0])
  if m < 2:
    raise ValueError("KID needs at least 2 samples in each set")
  rng = np.random.default_rng(seed)
  values = np.empty(num_subsets)
  for t in range(num_subsets):
    a = xr[rng.choice(xr.shape[0], m, replace=False)]
    b = xf[rng.choice(xf.shape[0], m, replace=False)]
    k_aa = (a @ a.T / d + 1.0) ** 3
    k_bb = (b @ b.T / d + 1.0) ** 3
    k_ab = (a @ b.T / d + 1.0) ** 3
    off_aa = k_aa.sum() - np.trace(k_aa)
    off_bb = k_bb.sum() - np.trace(k_bb)
    values[t] = (off_aa + off_bb) / (m * (m - 1)) - 2.0 * k_ab.sum() / (m * m)
  return float(values.mean()), float(values.std())


def _sq_norms(x: np.ndarray) -> np.ndarray:
  return np.einsum("ij,ij->i", x, x)


def _pairwise_sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
  d = _sq_norms(a)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d, 0.0)  # round-off can make tiny distances negative


def knn_radii(features: ArrayLike, k: int = 3, batch_size: int = 1024,
              dtype=np.float32) -> np.ndarray:
  """Squared distance from each sample to its k-th nearest other sample."""
  f = np.asarray(features, dtype=dtype)
  n = f.shape[0]
  if n <= k:
    raise ValueError(f"need more than k={k} samples, got {n}")
  f_sq = _sq_norms(f)
  radii = np.empty(n, dtype=np.float64)
  for s in range(0, n, batch_size):
    d = _pairwise_sq_dists(f[s:s + batch_size], f, f_sq)
    # Column k of the sorted row: index 0 is the sample itself (distance 0).
    radii[s:s + batch_size] = np.partition(d, k, axis=1)[:, k]
  return radii


def _coverage(queries: np.ndarray, support: np.ndarray, support_radii: np.ndarray,
              batch_size: int) -> float:
  """Fraction of queries within the k-NN ball of at least one support sample."""
  s_sq = _sq_norms(support)
  inside = 0
  for s in range(0, queries.shape[0], batch_size):
    d = _pairwise_sq_dists(queries[s:s + batch_size], support, s_sq)
    inside += int(np.count_nonzero(np.any(d <= support_radii[None, :], axis=1)))
  return inside / queries.shape[0]


def precision_recall(features_real: ArrayLike, features_fake: ArrayLike, k: int = 3,
                     batch_size: int = 1024, dtype=np.float32) -> Tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019), as (precision, recall).

  Each set's manifold is the union of balls around its samples with radius the
  distance to the k-th nearest neighbour within the set. Precision is the fraction
  of fake samples inside the real manifold, recall the fraction of real samples
  inside the fake manifold. Distances are computed in `batch_size` rows at a time so
  memory stays at batch_size x n; float32 by default for speed (the comparison is
  between distances of very different sizes, so float32 round-off does not matter).
  """
  xr = np.asarray(features_real, dtype=dtype)
  xf = np.asarray(features_fake, dtype=dtype)
  if xr.ndim != 2 or xf.ndim != 2 or xr.shape[1] != xf.shape[1]:
    raise ValueError(f"expected (n, d) feature arrays, got {xr.shape} and {xf.shape}")
  r_real = knn_radii(xr, k, batch_size, dtype)
  r_fake = knn_radii(xf, k, batch_size, dtype)
  precision = _coverage(xf, xr, r_real, batch_size)
  recall = _coverage(xr, xf, r_fake, batch_size)
  return precision, recall
