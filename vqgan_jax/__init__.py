"""vqgan_jax: Taming Transformers (VQGAN + GPT) in JAX/Flax."""

__version__ = "0.1.0"
