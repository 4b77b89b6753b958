"""Building blocks of the VQGAN encoder and decoder (taming-transformers' `model.py`).

Layouts are NHWC. Module and parameter names follow the reference (`norm1`, `conv1`,
`nin_shortcut`, `q`/`k`/`v`/`proj_out`, ...) so that converting a PyTorch checkpoint is
a rename table plus kernel transposes.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def Normalize(name: Optional[str] = None, dtype=jnp.float32) -> nn.GroupNorm:
  """GroupNorm with the reference's 32 groups and eps 1e-6."""
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, name=name)


def swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


class ResnetBlock(nn.Module):
  """norm -> swish -> conv3x3 -> norm -> swish -> dropout -> conv3x3, plus shortcut."""
  out_channels: Optional[int] = None
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_channels = x.shape[-1]
    out_channels = self.out_channels or in_channels
    h = swish(Normalize("norm1", self.dtype)(x))
    h = nn.Conv(out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv1")(h)
    h = swish(Normalize("norm2", self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv2")(h)
    if in_channels != out_channels:
      x = nn.Conv(out_channels, (1, 1), dtype=self.dtype, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with 1x1-conv projections (scale C^-0.5)."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    h = Normalize("norm", self.dtype)(x)
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
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding="VALID",
                   dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 followed by a 3x3 convolution."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(x.shape[-1], (3, 3), padding=1, dtype=self.dtype, name="conv")(x)
