"""Shared pytest setup for the vqgan_jax tests."""

from absl import flags

# grain reads absl flags; under pytest nobody parses argv, so mark them parsed
# (defaults) before any grain code asks for a flag value.
flags.FLAGS.mark_as_parsed()

import os  # pylint: disable=g-import-not-at-top,wrong-import-order

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

# Tests build the same tiny programs many times (every trainer run recompiles its
# steps); the persistent compilation cache turns the repeats into cache hits.
jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS", "cpu") or "cpu")
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("VQGAN_TEST_COMPILE_CACHE",
                                 os.path.join(os.path.dirname(__file__), "..", ".pytest_cache",
                                              "jax_compile_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="module")
def fast_prng():
  """The unsafe_rbg PRNG for a module: threefry initialisers compile far slower, and these
  tests compare runs with each other, not with fixed random draws."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "unsafe_rbg")
  yield
  jax.config.update("jax_default_prng_impl", previous)
