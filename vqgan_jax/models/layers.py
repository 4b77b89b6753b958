"""Building blocks of the VQGAN encoder and decoder (taming-transformers' `model.py`).

Layouts are NHWC. Module and parameter names follow the reference (`norm1`, `conv1`,
`nin_shortcut`, `q`/`k`/`v`/`proj_out`, ...) so that converting a PyTorch checkpoint is
a rename table plus kernel transposes.
"""

from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax import sharding

# XLA's CPU convolution is pathologically slow on tiny feature maps (a 3x3 conv on a
# 2x2 map with 512 channels runs at ~3 GFLOP/s, 60x below an equivalent matmul; its
# gradient is worse). At or below this many output positions per image, Conv lowers
# to explicit patches + one matmul instead, on CPU only (TPU and GPU convolutions have no
# such cliff). `python -m vqgan_jax.bench --task conv` shows the measurement.
IM2COL_MAX_POSITIONS = 16


def _output_size(size: int, kernel: int, stride: int, pad: Tuple[int, int]) -> int:
  return (size + pad[0] + pad[1] - kernel) // stride + 1


def _same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return (total // 2, total - total // 2)


def conv2d(x: jax.Array, kernel: jax.Array, strides: Tuple[int, int],
           padding: Tuple[Tuple[int, int], Tuple[int, int]]) -> jax.Array:
  """NHWC x HWIO convolution that picks the fast lowering for the map size."""
  kh, kw, cin, cout = kernel.shape
  out_h = _output_size(x.shape[1], kh, strides[0], padding[0])
  out_w = _output_size(x.shape[2], kw, strides[1], padding[1])
  if out_h * out_w > IM2COL_MAX_POSITIONS or kh * kw == 1 or not sharding.on_platform("cpu"):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  patches = [xp[:, i:i + strides[0] * (out_h - 1) + 1:strides[0],
                j:j + strides[1] * (out_w - 1) + 1:strides[1], :]
             for i in range(kh) for j in range(kw)]
  cols = jnp.concatenate(patches, axis=-1)  # (B, out_h, out_w, kh*kw*cin), HWI order
  return jnp.einsum("bhwk,ko->bhwo", cols, kernel.reshape(kh * kw * cin, cout))


class Conv(nn.Module):
  """A 2-D convolution with nn.Conv's parameter names ('kernel' HWIO, 'bias')."""
  features: int
  kernel_size: Tuple[int, int] = (3, 3)
  strides: Tuple[int, int] = (1, 1)
  padding: Any = "SAME"  # "SAME", "VALID", an int for all sides, or ((top, bottom), (left, right))
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        jnp.float32)
    pad = self.padding
    if isinstance(pad, int):
      pad = ((pad, pad), (pad, pad))
    elif pad == "VALID":
      pad = ((0, 0), (0, 0))
    elif pad == "SAME":
      pad = tuple(_same_padding(size, k, s) for size, k, s in
                  zip(x.shape[1:3], self.kernel_size, self.strides))
    elif isinstance(pad, str):
      raise ValueError(f"Conv padding must be 'SAME', 'VALID', an int or pairs, got {pad!r}")
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), tuple(self.strides), pad)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
    return y


def Normalize(name: Optional[str] = None, dtype=jnp.float32, groups: int = 32) -> nn.GroupNorm:
  """GroupNorm with eps 1e-6 and the reference's 32 groups (`groups` overrides).

  With as many groups as channels (ch=32 and 32 groups) it is an InstanceNorm: every
  channel loses its per-image mean and scale, so the decoder's last norm cannot pass
  an image's overall colour on to conv_out (see model.norm_groups).
  """
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype, name=name)


def swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


class ResnetBlock(nn.Module):
  """norm -> swish -> conv3x3 -> norm -> swish -> dropout -> conv3x3, plus shortcut."""
  out_channels: Optional[int] = None
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_channels = x.shape[-1]
    out_channels = self.out_channels or in_channels
    h = swish(Normalize("norm1", self.dtype, self.norm_groups)(x))
    h = Conv(out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv1")(h)
    h = swish(Normalize("norm2", self.dtype, self.norm_groups)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = Conv(out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv2")(h)
    if in_channels != out_channels:
      x = Conv(out_channels, (1, 1), dtype=self.dtype, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with 1x1-conv projections (scale C^-0.5)."""
  dtype: jnp.dtype = jnp.float32
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    h = Normalize("norm", self.dtype, self.norm_groups)(x)
    # 1x1 convolutions are dense layers over channels; Dense keeps the reference names.
    q = nn.Dense(c, dtype=self.dtype, name="q")(h).reshape(b, height * width, 1, c)
    k = nn.Dense(c, dtype=self.dtype, name="k")(h).reshape(b, height * width, 1, c)
    v = nn.Dense(c, dtype=self.dtype, name="v")(h).reshape(b, height * width, 1, c)
    out = jax.nn.dot_product_attention(q, k, v, scale=c ** -0.5)
    out = out.reshape(b, height, width, c)
    return x + nn.Dense(c, dtype=self.dtype, name="proj_out")(out)


class Downsample(nn.Module):
  """Zero-pad right and bottom by one, then a stride-2 3x3 convolution without padding."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return Conv(x.shape[-1], (3, 3), strides=(2, 2), padding="VALID",
                   dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 followed by a 3x3 convolution."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(x.shape[-1], (3, 3), padding=1, dtype=self.dtype, name="conv")(x)
