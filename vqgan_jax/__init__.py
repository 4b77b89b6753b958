"""vqgan_jax: Taming Transformers (VQGAN + GPT) in JAX/Flax."""

from vqgan_jax import xla_cpu as _xla_cpu

_xla_cpu.apply()

__version__ = "0.1.0"
