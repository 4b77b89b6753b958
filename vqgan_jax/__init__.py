"""vqgan_jax: Taming Transformers (VQGAN + GPT) in JAX/Flax."""

import os as _os

# TensorFlow (imported by tensorflow-datasets and clu) prints start-up banners through its
# C++ logger; keep them out of the terminal unless the user chose a level.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from vqgan_jax import xla_cpu as _xla_cpu  # pylint: disable=wrong-import-position

_xla_cpu.apply()

__version__ = "0.1.0"
