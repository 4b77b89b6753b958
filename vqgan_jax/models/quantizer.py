"""Vector quantizer: nearest-code lookup with straight-through gradients.

Two placements of beta, as in taming-transformers' `VectorQuantizer2`:
  legacy=True  (reference default): mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2)
  legacy=False (VQ-VAE paper):      beta * mean((sg(z_q) - z)^2) + mean((z_q - sg(z))^2)
The first term trains the encoder (commitment), the second the codebook.

Optional modern lookup (ViT-VQGAN / LlamaGen): with `codebook_dim` set, latents are
projected to a low dimension before the lookup and back afterwards, and with
`l2_normalize` both latents and codes are compared on the unit sphere.
"""

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def _uniform_codebook_init(n_embed: int):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -1.0 / n_embed, 1.0 / n_embed)
  return init


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """||z - e||^2 for every row of z (N, D) against every code (K, D); shape (N, K)."""
  return (jnp.sum(z * z, axis=-1, keepdims=True) + jnp.sum(codebook * codebook, axis=-1)[None, :]
          - 2.0 * z @ codebook.T)


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """Index of the nearest code for each row of z."""
  return jnp.argmin(squared_distances(z, codebook), axis=-1).astype(jnp.int32)


class VectorQuantizer(nn.Module):
  """Maps (..., embed_dim) latents to their nearest codebook entries."""
  n_embed: int
  embed_dim: int
  beta: float = 0.25
  legacy: bool = True
  codebook_dim: Optional[int] = None  # None or 0: look codes up in embed_dim
  l2_normalize: bool = False

  @property
  def lookup_dim(self) -> int:
    return self.codebook_dim or self.embed_dim

  def setup(self):
    self.embedding = self.param("embedding", _uniform_codebook_init(self.n_embed),
                                (self.n_embed, self.lookup_dim), jnp.float32)
    if self.codebook_dim:
      self.in_proj = nn.Dense(self.codebook_dim, name="in_proj")
      self.out_proj = nn.Dense(self.embed_dim, name="out_proj")

  def codebook(self) -> jax.Array:
    """The codes as they are compared with latents (normalised if l2_normalize)."""
    codes = self.embedding
    return _l2_normalize(codes) if self.l2_normalize else codes

  def project_in(self, z: jax.Array) -> jax.Array:
    z = z.astype(jnp.float32)
    if self.codebook_dim:
      z = self.in_proj(z)
    return _l2_normalize(z) if self.l2_normalize else z

  def project_out(self, z_q: jax.Array) -> jax.Array:
    return self.out_proj(z_q) if self.codebook_dim else z_q

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Code vectors (in embed_dim) for integer indices of any shape."""
    return self.project_out(jnp.take(self.codebook(), indices, axis=0))

  def __call__(self, z: jax.Array) -> Tuple[jax.Array, jax.Array, Dict[str, Any]]:
    """Returns (z_q with straight-through gradient, quantizer loss, info)."""
    z_lookup = self.project_in(z)
    codes = self.codebook()
    flat = z_lookup.reshape(-1, self.lookup_dim)
    indices = nearest_code(flat, codes)
    z_q = jnp.take(codes, indices, axis=0).reshape(z_lookup.shape)
    commitment = jnp.mean((jax.lax.stop_gradient(z_q) - z_lookup) ** 2)
    codebook_term = jnp.mean((z_q - jax.lax.stop_gradient(z_lookup)) ** 2)
    if self.legacy:
      loss = commitment + self.beta * codebook_term
    else:
      loss = self.beta * commitment + codebook_term
    z_q = z_lookup + jax.lax.stop_gradient(z_q - z_lookup)
    info = {
        "indices": indices.reshape(z.shape[:-1]),
        "z_lookup": z_lookup,  # latents in lookup space (used to restart dead codes)
    }
    return self.project_out(z_q).astype(z.dtype), loss, info
