"""The FID InceptionV3 network in Flax linen (pool3 features and 1008-way logits).

This is the network behind FID as computed by pytorch-fid: torchvision's InceptionV3
layout with the blocks patched to match the TF 2015-12-05 Inception graph
(`FIDInceptionA`, `FIDInceptionC`, `FIDInceptionE_1`, `FIDInceptionE_2`), 1008
output classes and no auxiliary classifier. It exists so that FID / IS / KID /
precision-recall can be computed in JAX with numbers comparable to published ones,
once pytorch-fid's weights are converted with `vqgan_jax.convert_inception`.

Differences from torchvision's ImageNet InceptionV3 that matter for the numbers:
  * the 3x3 average pools inside the A, C and E_1 blocks ignore padded zeros
    (TF semantics, torch `count_include_pad=False`);
  * the pool branch of the last block (Mixed_7c, E_2) uses a 3x3 *max* pool;
  * BatchNorm has eps 1e-3 and is inference-only here.

Input: NHWC images in [-1, 1] of any size; they are bilinearly resized to 299x299
(pytorch-fid's `resize_input`, i.e. `F.interpolate(mode='bilinear',
align_corners=False)`, then its [0, 1] -> [-1, 1] mapping, which commutes with the
linear resize). `jax.image.resize(..., 'bilinear', antialias=False)` samples at
half-pixel centres and renormalises the triangle kernel where it leaves the image,
which is the same as torch's align_corners=False (source coordinate
(i + 0.5) * in/out - 0.5, clamped at the borders); antialias must be off for
downsampling to match torch. tests/test_inception.py checks this against a direct
numpy transcription of torch's rule, and it was checked once against torch itself.

Output: `{'pool': (B, 2048), 'logits': (B, 1008)}`. Module names mirror pytorch-fid's
(Conv2d_1a_3x3, ..., Mixed_7c, fc; inside blocks branch1x1, branch5x5_1, ...; each
BasicConv2d has `conv` and `bn`), so converting its state dict is a rename table
(see `vqgan_jax.convert_inception`).
"""

from typing import Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPSILON = 1e-3


class FrozenBatchNorm(nn.Module):
  """Inference-only BatchNorm: y = (x - mean) / sqrt(var + eps) * scale + bias.

  The running statistics are plain parameters (`mean`, `var`) next to `scale` and
  `bias`, never updated: this network is only ever evaluated with fixed weights, and
  keeping everything in one 'params' collection makes the checkpoint a flat
  rename of pytorch-fid's state dict.
  """
  epsilon: float = BN_EPSILON
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x * mul + (bias - mean * mul)).astype(self.dtype)


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU, torchvision's BasicConv2d."""
  features: int
  kernel_size: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  padding: Tuple[int, int] = (0, 0)  # symmetric (pad_h, pad_w), as torch's `padding`
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                kernel_init=nn.initializers.he_normal(), name="conv")(x)
    x = FrozenBatchNorm(dtype=self.dtype, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  # TF's SAME average pool divides by the number of real pixels in the window.
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
  # Padding is filled with -inf by flax's max pool, i.e. ignored, as in torch.
  return nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class FIDInceptionA(nn.Module):
  """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(no pad count)-1x1."""
  pool_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)
    b1 = conv(64, (1, 1), (0, 0), "branch1x1")(x)
    b5 = conv(48, (1, 1), (0, 0), "branch5x5_1")(x)
    b5 = conv(64, (5, 5), (2, 2), "branch5x5_2")(b5)
    b3 = conv(64, (1, 1), (0, 0), "branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), (0, 0), "branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv2d(384, (3, 3), (2, 2), dtype=self.dtype, name="branch3x3")(x)
    bd = BasicConv2d(64, (1, 1), dtype=self.dtype, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), dtype=self.dtype, name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), (2, 2), dtype=self.dtype, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b..6e: factorised 7x7 branches (1x7 / 7x1) and avgpool(no pad count)-1x1."""
  channels_7x7: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)
    one, row, col = (1, 1), (1, 7), (7, 1)
    no_pad, row_pad, col_pad = (0, 0), (0, 3), (3, 0)
    b1 = conv(192, one, no_pad, "branch1x1")(x)
    b7 = conv(c7, one, no_pad, "branch7x7_1")(x)
    b7 = conv(c7, row, row_pad, "branch7x7_2")(b7)
    b7 = conv(192, col, col_pad, "branch7x7_3")(b7)
    bd = conv(c7, one, no_pad, "branch7x7dbl_1")(x)
    bd = conv(c7, col, col_pad, "branch7x7dbl_2")(bd)
    bd = conv(c7, row, row_pad, "branch7x7dbl_3")(bd)
    bd = conv(c7, col, col_pad, "branch7x7dbl_4")(bd)
    bd = conv(192, row, row_pad, "branch7x7dbl_5")(bd)
    bp = conv(192, one, no_pad, "branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, s, p, name: BasicConv2d(f, k, s, p, dtype=self.dtype, name=name)
    b3 = conv(192, (1, 1), (1, 1), (0, 0), "branch3x3_1")(x)
    b3 = conv(320, (3, 3), (2, 2), (0, 0), "branch3x3_2")(b3)
    b7 = conv(192, (1, 1), (1, 1), (0, 0), "branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), (1, 1), (0, 3), "branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), (1, 1), (3, 0), "branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), (2, 2), (0, 0), "branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (`pool='avg'`, FIDInceptionE_1) and Mixed_7c (`pool='max'`, E_2).

  The TF graph's last block pools with a 3x3 max pool, unlike the paper; pytorch-fid
  reproduces that and so must we.
  """
  pool: str = "avg"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)
    b1 = conv(320, (1, 1), (0, 0), "branch1x1")(x)
    b3 = conv(384, (1, 1), (0, 0), "branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), (0, 1), "branch3x3_2a")(b3),
                          conv(384, (3, 1), (1, 0), "branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, (1, 1), (0, 0), "branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), (1, 1), "branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), (0, 1), "branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), (1, 0), "branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3_same(x)
    elif self.pool == "max":
      pooled = _max_pool_3x3_same(x)
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    bp = conv(192, (1, 1), (0, 0), "branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_to_input(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """Bilinear resize of NHWC images to size x size, as torch's align_corners=False.

  antialias=False: torch's F.interpolate does not low-pass when downsampling.
  """
  b, h, w, c = x.shape
  if (h, w) == (size, size):
    return x
  return jax.image.resize(x, (b, size, size, c), method="bilinear", antialias=False)


class InceptionV3(nn.Module):
  """pytorch-fid's FID InceptionV3. `apply(variables, images) -> {'pool', 'logits'}`.

  Attributes:
    resize_input: resize inputs to 299x299 first (pytorch-fid's default). Without it
      the network runs fully convolutionally on the given size (the fc still sees
      2048 pooled features), which does not give comparable FIDs.
    num_classes: width of the fc layer; 1008 in the FID weights.
  """
  resize_input: bool = True
  num_classes: int = NUM_CLASSES
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> Dict[str, jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
    x = jnp.asarray(images, jnp.float32)
    if self.resize_input:
      x = resize_to_input(x)
    x = x.astype(self.dtype)
    conv = lambda f, k, s, p, name: BasicConv2d(f, k, s, p, dtype=self.dtype, name=name)
    # Stem (pytorch-fid block 0 and 1).
    x = conv(32, (3, 3), (2, 2), (0, 0), "Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), (1, 1), (0, 0), "Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), (1, 1), (1, 1), "Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = conv(80, (1, 1), (1, 1), (0, 0), "Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), (1, 1), (0, 0), "Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    # 35x35 (block 2).
    x = FIDInceptionA(32, dtype=self.dtype, name="Mixed_5b")(x)
    x = FIDInceptionA(64, dtype=self.dtype, name="Mixed_5c")(x)
    x = FIDInceptionA(64, dtype=self.dtype, name="Mixed_5d")(x)
    # 17x17.
    x = InceptionB(dtype=self.dtype, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                     ("Mixed_6e", 192)):
      x = FIDInceptionC(c7, dtype=self.dtype, name=name)(x)
    # 8x8 (block 3).
    x = InceptionD(dtype=self.dtype, name="Mixed_7a")(x)
    x = FIDInceptionE("avg", dtype=self.dtype, name="Mixed_7b")(x)
    x = FIDInceptionE("max", dtype=self.dtype, name="Mixed_7c")(x)
    # Global average pool = pool3 features; accumulate in float32 whatever the dtype.
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    # Dropout sits here in torchvision; it is the identity at evaluation.
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(pool)
    return {"pool": pool, "logits": logits}


def param_shapes(model: InceptionV3 = None,
                 input_shape: Sequence[int] = (1, INPUT_SIZE, INPUT_SIZE, 3)):
  """The model's parameter tree as jax.ShapeDtypeStruct leaves, without computing."""
  model = model if model is not None else InceptionV3()
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
