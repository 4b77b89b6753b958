"""The VQGAN autoencoder of stage 1: Encoder, Decoder and VQModel.

VQModel's methods are the quantizer API the rest of the project uses:
  encode(x)               -> (z_q, quantizer loss, info with "indices")
  encode_to_indices(x)    -> (B, h, w) int32 code indices
  decode(z_q)             -> images in [-1, 1] (not clipped; no tanh, as the reference)
  decode_indices(indices) -> images from (B, h, w) indices
  codebook()              -> (codebook_size, lookup_dim) codes as compared with latents

The quantizer is `model.quantizer` of the config: "vq" (default, the paper's), "vq_ema",
"fsq", "lfq" or "simvq" (see models/quantizer.py). vq_ema and simvq keep variables in
the `vq_stats` collection (quantizer.QUANTIZER_STATE) that every apply must be given
(stored parameter trees keep it under a top-level "vq_stats" key: apply with
`as_variables(params)`, see below);
lfq's q_loss includes its entropy penalty, and `__call__`'s output then carries the
quantizer's scalar diagnostics under "q_metrics".

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
from vqgan_jax.models import quantizer as quantizers


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
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    ResnetBlock, AttnBlock = _blocks(self.remat)  # pylint: disable=invalid-name,redefined-outer-name
    h = Conv(self.ch, (3, 3), padding=1, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    curr_res = self.resolution
    for level, mult in enumerate(self.ch_mult):
      for block in range(self.num_res_blocks):
        h = ResnetBlock(self.ch * mult, self.dropout, self.dtype, self.norm_groups,
                        name=f"down_{level}_block_{block}")(h, train)
        h = _pin(h)
        if curr_res in self.attn_resolutions:
          h = _pin(AttnBlock(self.dtype, self.norm_groups, name=f"down_{level}_attn_{block}")(h))
      if level != len(self.ch_mult) - 1:
        h = Downsample(self.dtype, name=f"down_{level}_downsample")(h)
        curr_res //= 2
    h = ResnetBlock(None, self.dropout, self.dtype, self.norm_groups, name="mid_block_1")(h, train)
    h = AttnBlock(self.dtype, self.norm_groups, name="mid_attn_1")(h)
    h = _pin(ResnetBlock(None, self.dropout, self.dtype, self.norm_groups, name="mid_block_2")(h, train))
    h = swish(Normalize("norm_out", self.dtype, self.norm_groups)(h))
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
  norm_groups: int = 32

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False, return_features: bool = False):
    ResnetBlock, AttnBlock = _blocks(self.remat)  # pylint: disable=invalid-name,redefined-outer-name
    num_levels = len(self.ch_mult)
    curr_res = self.resolution // 2 ** (num_levels - 1)
    block_in = self.ch * self.ch_mult[-1]
    h = Conv(block_in, (3, 3), padding=1, dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
    h = ResnetBlock(None, self.dropout, self.dtype, self.norm_groups, name="mid_block_1")(h, train)
    h = AttnBlock(self.dtype, self.norm_groups, name="mid_attn_1")(h)
    h = _pin(ResnetBlock(None, self.dropout, self.dtype, self.norm_groups, name="mid_block_2")(h, train))
    for level in reversed(range(num_levels)):
      for block in range(self.num_res_blocks + 1):
        h = ResnetBlock(self.ch * self.ch_mult[level], self.dropout, self.dtype, self.norm_groups,
                        name=f"up_{level}_block_{block}")(h, train)
        h = _pin(h)
        if curr_res in self.attn_resolutions:
          h = _pin(AttnBlock(self.dtype, self.norm_groups, name=f"up_{level}_attn_{block}")(h))
      if level != 0:
        h = Upsample(self.dtype, name=f"up_{level}_upsample")(h)
        curr_res *= 2
    features = swish(Normalize("norm_out", self.dtype, self.norm_groups)(h))
    x = Conv(self.out_ch, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(features)
    x = x.astype(jnp.float32)
    return (x, features) if return_features else x


def conv_out_apply(kernel: jax.Array, bias: jax.Array, features: jax.Array) -> jax.Array:
  """The decoder's last layer as a pure function of its weights (for the adaptive GAN weight)."""
  out = conv2d(features.astype(kernel.dtype), kernel, (1, 1), ((1, 1), (1, 1)))
  return (out + bias).astype(jnp.float32)


class VQModel(nn.Module):
  """Encoder -> quant_conv -> quantizer -> post_quant_conv -> Decoder.

  The quantizer (submodule `quantize`) is `quantizer`'s kind; n_embed is its size for
  vq, vq_ema and simvq, and ignored by fsq (prod(fsq_levels) codes) and lfq (2**lfq_bits).
  """
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
  quantizer: str = "vq"
  ema_decay: float = 0.99
  ema_eps: float = 1e-5
  fsq_levels: Sequence[int] = (8, 5, 5, 5)
  lfq_bits: int = 10
  lfq_entropy_weight: float = 0.1
  lfq_commit_weight: float = 0.25
  lfq_temperature: float = 0.01
  lfq_entropy_group_bits: int = 10
  norm_groups: int = 32

  def setup(self):
    common = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  attn_resolutions=tuple(self.attn_resolutions), dropout=self.dropout,
                  resolution=self.resolution, z_channels=self.z_channels, dtype=self.dtype,
                  remat=self.remat, norm_groups=self.norm_groups)
    self.encoder = Encoder(**common)
    self.decoder = Decoder(out_ch=self.out_ch, **common)
    self.quant_conv = nn.Dense(self.embed_dim, name="quant_conv")
    self.post_quant_conv = nn.Dense(self.z_channels, name="post_quant_conv")
    self.quantize = quantizers.build_quantizer(
        self.quantizer, n_embed=self.n_embed, embed_dim=self.embed_dim, beta=self.beta,
        legacy=self.legacy_beta, codebook_dim=self.codebook_dim,
        l2_normalize=self.l2_normalize, ema_decay=self.ema_decay, ema_eps=self.ema_eps,
        fsq_levels=tuple(self.fsq_levels), lfq_bits=self.lfq_bits,
        lfq_entropy_weight=self.lfq_entropy_weight, lfq_commit_weight=self.lfq_commit_weight,
        lfq_temperature=self.lfq_temperature,
        lfq_entropy_group_bits=self.lfq_entropy_group_bits)

  @property
  def codebook_size(self) -> int:
    return quantizers.codebook_size_of(self.quantizer, self.n_embed, self.fsq_levels,
                                       self.lfq_bits)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def encode(self, x: jax.Array, train: bool = False) -> Tuple[jax.Array, jax.Array, Dict[str, Any]]:
    h = self.quant_conv(self.encoder(x, train).astype(jnp.float32))
    return self.quantize(h, train)

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
    out = {"x_rec": x_rec, "features": features, "q_loss": q_loss,
           "indices": info["indices"], "z_lookup": info["z_lookup"]}
    q_metrics = {k: v for k, v in info.items() if k not in ("indices", "z_lookup")}
    if q_metrics:
      out["q_metrics"] = q_metrics
    return out


# ---------------------------------------------------------------------------------------
# Stored parameters <-> flax variables
# ---------------------------------------------------------------------------------------
# A stage-1 parameter tree *as stored* (trainer state, checkpoints' `model` item,
# FrozenStage1.params) is the flax "params" collection plus, for quantizers with state
# (vq_ema, simvq), the "vq_stats" collection under a top-level key of the same name:
#     {"encoder": ..., "quantize": ..., ..., "vq_stats": {"quantize": {...}}}
# vq, fsq and lfq have no such key, so their trees (and old checkpoints) are unchanged.
# Every apply of a VQModel goes through `as_variables`.
STATE_KEY = quantizers.QUANTIZER_STATE


def split_state(params) -> Tuple[Any, Any]:
  """(trainable params, vq_stats collection or {}) of a stored stage-1 tree."""
  if STATE_KEY not in params:
    return params, {}
  return {k: v for k, v in params.items() if k != STATE_KEY}, params[STATE_KEY]


def with_state(params, stats) -> Any:
  """The stored tree of trainable params and a vq_stats collection (params when empty)."""
  if not stats:
    return params
  return {**params, STATE_KEY: stats}


def as_variables(params) -> Dict[str, Any]:
  """Flax variables of a stored stage-1 tree: {"params": ..., "vq_stats": ...} (the
  second only when the quantizer has state), for `VQModel.apply`."""
  trainable, stats = split_state(params)
  variables = {"params": trainable}
  if stats:
    variables[STATE_KEY] = stats
  return variables


def stored_params(variables) -> Any:
  """The stored tree of a VQModel's variables (`model.init`'s output): the inverse of
  `as_variables`."""
  return with_state(variables["params"], variables.get(STATE_KEY, {}))


def vqmodel_from_config(model_config, dtype=jnp.float32) -> VQModel:
  """Builds VQModel from a `config.model` ConfigDict with reference yaml key names.

  The quantizer keys (quantizer.QUANTIZER_DEFAULTS: `quantizer`, `fsq_levels`, ...) may
  be absent (old configs): the defaults give the paper's VQ. Raises ValueError for a
  quantizer that cannot be built, or whose codebook size is not model.n_embed.
  """
  c = model_config
  quantizers.make_quantizer(c)  # checks the quantizer keys against n_embed
  return VQModel(
      ch=c.ch, ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks,
      attn_resolutions=tuple(c.attn_resolutions), dropout=c.dropout, resolution=c.resolution,
      in_channels=c.in_channels, out_ch=c.out_ch, z_channels=c.z_channels,
      embed_dim=c.embed_dim, n_embed=c.n_embed, beta=c.beta, legacy_beta=c.legacy_beta,
      codebook_dim=c.codebook_dim, l2_normalize=c.l2_normalize, dtype=dtype,
      remat=bool(c.get("remat", False)), norm_groups=int(c.get("norm_groups", 32)),
      **quantizers.quantizer_options(c))
