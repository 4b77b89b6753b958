"""vqgan_jax: Taming Transformers (VQGAN + GPT) in JAX/Flax."""

import os as _os

# TensorFlow (imported by tensorflow-datasets and clu) prints start-up banners through its
# C++ logger; keep them out of the terminal unless the user chose a level.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow only writes summaries and decodes TFDS records here; its oneDNN notice is
# printed before its log level applies, so switch the (unused) oneDNN kernels off.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from vqgan_jax import xla_cpu as _xla_cpu  # pylint: disable=wrong-import-position

_xla_cpu.apply()

__version__ = "0.1.0"
