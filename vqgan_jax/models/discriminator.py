"""PatchGAN discriminator (pix2pix `NLayerDiscriminator`) used by the VQGAN's GAN loss.

Per-patch logits: a 256x256 input gives 30x30 logits with the default three layers.
The reference uses BatchNorm; "group" and "none" are offered because BatchNorm's batch
statistics couple the examples of a batch (and so the devices of a data-parallel mesh).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.models.layers import Conv


def _normal_init(mean: float, stddev: float):
  def init(key, shape, dtype=jnp.float32):
    return mean + stddev * jax.random.normal(key, shape, dtype)
  return init


class NLayerDiscriminator(nn.Module):
  ndf: int = 64
  n_layers: int = 3
  norm: str = "batch"  # "batch" (reference) | "group" | "none"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    conv_init = _normal_init(0.0, 0.02)

    def conv(features, stride, use_bias, name):
      return Conv(features, (4, 4), strides=(stride, stride), padding=1, use_bias=use_bias,
                     kernel_init=conv_init, dtype=self.dtype, name=name)

    def normalize(h, name):
      if self.norm == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            scale_init=_normal_init(1.0, 0.02), dtype=self.dtype, name=name)(h)
      if self.norm == "group":
        return nn.GroupNorm(num_groups=32, scale_init=_normal_init(1.0, 0.02),
                            dtype=self.dtype, name=name)(h)
      return h

    use_bias = self.norm == "none"
    h = nn.leaky_relu(conv(self.ndf, 2, True, "conv_0")(x.astype(self.dtype)), 0.2)
    mult = 1
    for n in range(1, self.n_layers + 1):
      mult = min(2 ** n, 8)
      stride = 2 if n < self.n_layers else 1
      h = conv(self.ndf * mult, stride, use_bias, f"conv_{n}")(h)
      h = nn.leaky_relu(normalize(h, f"norm_{n}"), 0.2)
    return conv(1, 1, True, f"conv_{self.n_layers + 1}")(h).astype(jnp.float32)
