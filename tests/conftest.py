"""Shared pytest setup for the vqgan_jax tests."""

from absl import flags

# grain reads absl flags; under pytest nobody parses argv, so mark them parsed
# (defaults) before any grain code asks for a flag value.
flags.FLAGS.mark_as_parsed()
