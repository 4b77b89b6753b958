"""Pure loss functions of stage 1 (VQGAN) and stage 2 (GPT).

Stage 1 follows taming-transformers' `VQLPIPSWithDiscriminator`:
  total = nll + lambda * disc_factor * g_loss + codebook_weight * q_loss
with nll = mean(|x - x_rec|) + perceptual_weight * mean(LPIPS(x, x_rec)),
g_loss = -mean(D(x_rec)) and lambda the adaptive weight at the decoder's last layer.
"""

import jax
import jax.numpy as jnp

# The reference code's delta (the paper writes 1e-6) and clamp.
ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


def pixel_loss(x: jax.Array, x_rec: jax.Array, kind: str = "l1") -> jax.Array:
  diff = x.astype(jnp.float32) - x_rec.astype(jnp.float32)
  if kind == "l1":
    return jnp.mean(jnp.abs(diff))
  if kind == "l2":
    return jnp.mean(diff * diff)
  raise ValueError(f"loss.pixel_loss must be 'l1' or 'l2', got {kind!r}")


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def discriminator_loss(logits_real, logits_fake, kind: str = "hinge") -> jax.Array:
  if kind == "hinge":
    return hinge_d_loss(logits_real, logits_fake)
  if kind == "vanilla":
    return vanilla_d_loss(logits_real, logits_fake)
  raise ValueError(f"loss.disc_loss must be 'hinge' or 'vanilla', got {kind!r}")


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
  return -jnp.mean(logits_fake)


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
  """lambda = ||grad nll|| / (||grad g|| + 1e-4), clamped to [0, 1e4], no gradient, x disc_weight.

  Both gradients are taken with respect to the decoder's last layer.
  """
  weight = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + ADAPTIVE_WEIGHT_EPS)
  weight = jnp.clip(weight, 0.0, ADAPTIVE_WEIGHT_MAX)
  return jax.lax.stop_gradient(weight) * disc_weight


def adopt_weight(step, threshold: int, value: float = 1.0, before: float = 0.0):
  """The reference's `adopt_weight`: `before` until `step` reaches `threshold`, then `value`."""
  return jnp.where(step < threshold, before, value)


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """Mean next-token cross-entropy (nats) over positions where mask is true, and the count."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  count = jnp.sum(mask)
  return jnp.sum(nll * mask) / jnp.maximum(count, 1.0), count
