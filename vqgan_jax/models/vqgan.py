"""The VQGAN autoencoder of stage 1: Encoder, Decoder and VQModel.

VQModel's methods are the quantizer API the rest of the project uses:
  encode(x)               -> (z_q, quantizer loss, info with "indices")
  encode_to_indices(x)    -> (B, h, w) int32 code indices
  decode(z_q)             -> images in [-1, 1] (not clipped; no tanh, as the reference)
  decode_indices(indices) -> images from (B, h, w) indices
  codebook()              -> (n_embed, lookup_dim) codes as compared with latents

`remat=True` recomputes each ResnetBlock and AttnBlock in the backward pass (the
parameter tree is unchanged); every block's output is constrained to be split over the
batch axes when traced under a mesh (`sharding.constrain`).
"""

from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax import sharding
from vqgan_jax.models.layers import AttnBlock, Conv, conv2d, Downsample, Normalize, ResnetBlock, Upsample, swish
from vqgan_jax.models.quantizer import VectorQuantizer


def _pin(h: jax.Array) -> jax.Array:
  """An NHWC activation split over the batch axes (a no-op outside a mesh)."""
  return sharding.constrain(h, "batch", None, None, None)


def _blocks(remat: bool):
  """(ResnetBlock, AttnBlock) classes, rematerialised in the backward pass if asked."""
  if not remat:
    return ResnetBlock, AttnBlock
  # ResnetBlock's `train` (argument 2 counting self) is a Python bool: static under remat.
  return nn.remat(ResnetBlock, static_argnums=(2,)), nn.remat(AttnBlock)


class Encoder(nn.Module):
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  resolution: int = 256
  z_channels: int = 256
  double_z: bool = False
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    ResnetBlock, AttnBlock = _blocks(self.remat)  # pylint: disable=invalid-name,redefined-outer-name
    h = Conv(self.ch, (3, 3), padding=1, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    curr_res = self.resolution
    for level, mult in enumerate(self.ch_mult):
      for block in range(self.num_res_blocks):
        h = ResnetBlock(self.ch * mult, self.dropout, self.dtype,
                        name=f"down_{level}_block_{block}")(h, train)
        h = _pin(h)
        if curr_res in self.attn_resolutions:
          h = _pin(AttnBlock(self.dtype, name=f"down_{level}_attn_{block}")(h))
      if level != len(self.ch_mult) - 1:
        h = Downsample(self.dtype, name=f"down_{level}_downsample")(h)
        curr_res //= 2
    h = ResnetBlock(None, self.dropout, self.dtype, name="mid_block_1")(h, train)
    h = AttnBlock(self.dtype, name="mid_attn_1")(h)
    h = _pin(ResnetBlock(None, self.dropout, self.dtype, name="mid_block_2")(h, train))
    h = swish(Normalize("norm_out", self.dtype)(h))
    out_channels = 2 * self.z_channels if self.double_z else self.z_channels
    return Conv(out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(h)


class Decoder(nn.Module):
  """Levels run from the lowest resolution up; `up_0_*` is the highest, as in the reference."""
  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  resolution: int = 256
  z_channels: int = 256
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False, return_features: bool = False):
    ResnetBlock, AttnBlock = _blocks(self.remat)  # pylint: disable=invalid-name,redefined-outer-name
    num_levels = len(self.ch_mult)
    curr_res = self.resolution // 2 ** (num_levels - 1)
    block_in = self.ch * self.ch_mult[-1]
    h = Conv(block_in, (3, 3), padding=1, dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
    h = ResnetBlock(None, self.dropout, self.dtype, name="mid_block_1")(h, train)
    h = AttnBlock(self.dtype, name="mid_attn_1")(h)
    h = _pin(ResnetBlock(None, self.dropout, self.dtype, name="mid_block_2")(h, train))
    for level in reversed(range(num_levels)):
      for block in range(self.num_res_blocks + 1):
        h = ResnetBlock(self.ch * self.ch_mult[level], self.dropout, self.dtype,
                        name=f"up_{level}_block_{block}")(h, train)
        h = _pin(h)
        if curr_res in self.attn_resolutions:
          h = _pin(AttnBlock(self.dtype, name=f"up_{level}_attn_{block}")(h))
      if level != 0:
        h = Upsample(self.dtype, name=f"up_{level}_upsample")(h)
        curr_res *= 2
    features = swish(Normalize("norm_out", self.dtype)(h))
    x = Conv(self.out_ch, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(features)
    x = x.astype(jnp.float32)
    return (x, features) if return_features else x


def conv_out_apply(kernel: jax.Array, bias: jax.Array, features: jax.Array) -> jax.Array:
  """The decoder's last layer as a pure function of its weights (for the adaptive GAN weight)."""
  out = conv2d(features.astype(kernel.dtype), kernel, (1, 1), ((1, 1), (1, 1)))
  return (out + bias).astype(jnp.float32)


class VQModel(nn.Module):
  """Encoder -> quant_conv -> VectorQuantizer -> post_quant_conv -> Decoder."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  resolution: int = 256
  in_channels: int = 3
  out_ch: int = 3
  z_channels: int = 256
  embed_dim: int = 256
  n_embed: int = 1024
  beta: float = 0.25
  legacy_beta: bool = True
  codebook_dim: int = 0
  l2_normalize: bool = False
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  def setup(self):
    common = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  attn_resolutions=tuple(self.attn_resolutions), dropout=self.dropout,
                  resolution=self.resolution, z_channels=self.z_channels, dtype=self.dtype,
                  remat=self.remat)
    self.encoder = Encoder(**common)
    self.decoder = Decoder(out_ch=self.out_ch, **common)
    self.quant_conv = nn.Dense(self.embed_dim, name="quant_conv")
    self.post_quant_conv = nn.Dense(self.z_channels, name="post_quant_conv")
    self.quantize = VectorQuantizer(self.n_embed, self.embed_dim, self.beta, self.legacy_beta,
                                    self.codebook_dim or None, self.l2_normalize)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def encode(self, x: jax.Array, train: bool = False) -> Tuple[jax.Array, jax.Array, Dict[str, Any]]:
    h = self.quant_conv(self.encoder(x, train).astype(jnp.float32))
    return self.quantize(h)

  def encode_to_indices(self, x: jax.Array) -> jax.Array:
    return self.encode(x)[2]["indices"]

  def decode(self, z_q: jax.Array, train: bool = False, return_features: bool = False):
    return self.decoder(self.post_quant_conv(z_q), train, return_features)

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    return self.decode(self.quantize.lookup(indices))

  def codebook(self) -> jax.Array:
    return self.quantize.codebook()

  def __call__(self, x: jax.Array, train: bool = False) -> Dict[str, Any]:
    z_q, q_loss, info = self.encode(x, train)
    x_rec, features = self.decode(z_q, train, return_features=True)
    return {"x_rec": x_rec, "features": features, "q_loss": q_loss,
            "indices": info["indices"], "z_lookup": info["z_lookup"]}


def vqmodel_from_config(model_config, dtype=jnp.float32) -> VQModel:
  """Builds VQModel from a `config.model` ConfigDict with reference yaml key names."""
  c = model_config
  return VQModel(
      ch=c.ch, ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks,
      attn_resolutions=tuple(c.attn_resolutions), dropout=c.dropout, resolution=c.resolution,
      in_channels=c.in_channels, out_ch=c.out_ch, z_channels=c.z_channels,
      embed_dim=c.embed_dim, n_embed=c.n_embed, beta=c.beta, legacy_beta=c.legacy_beta,
      codebook_dim=c.codebook_dim, l2_normalize=c.l2_normalize, dtype=dtype,
      remat=bool(c.get("remat", False)))
