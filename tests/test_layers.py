"""`layers.conv2d`'s im2col lowering against XLA's convolution, and the default XLA:CPU
flags (`vqgan_jax.xla_cpu`)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax import xla_cpu
from vqgan_jax.models import layers


def _xla_conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# (batch, size, cin, cout, kernel, stride, padding): a 3x3 conv, the Downsample (stride 2,
# no padding on a map padded right/bottom by the caller), a 4x4 stride-2 discriminator conv.
CASES = [
    (2, 4, 32, 48, 3, 1, ((1, 1), (1, 1))),
    (2, 7, 32, 32, 3, 2, ((0, 0), (0, 0))),
    (1, 6, 16, 32, 4, 2, ((1, 1), (1, 1))),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_s{}_c{}-{}_k{}_st{}".format(*c[:6]))
def test_conv2d_im2col_matches_xla(monkeypatch, case):
  batch, size, cin, cout, k, stride, padding = case
  monkeypatch.setattr(layers, "IM2COL_MAX_POSITIONS", 1 << 30)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(keys[0], (batch, size, size, cin))
  w = 0.05 * jax.random.normal(keys[1], (k, k, cin, cout))
  strides = (stride, stride)
  ref_out = _xla_conv(x, w, strides, padding)
  ct = jax.random.normal(keys[2], ref_out.shape)
  fn = lambda x, w: layers.conv2d(x, w, strides, padding)
  assert "concatenate" in str(jax.make_jaxpr(fn)(x, w))  # really the im2col path
  np.testing.assert_allclose(fn(x, w), ref_out, rtol=1e-5, atol=1e-5)
  got = jax.grad(lambda x, w: jnp.vdot(fn(x, w), ct), argnums=(0, 1))(x, w)
  want = jax.grad(lambda x, w: jnp.vdot(_xla_conv(x, w, strides, padding), ct),
                  argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(r))))


def test_default_xla_flags_respect_the_user(monkeypatch):
  monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: xla_cpu.MEASURED_JAXLIB_VERSIONS[0])
  env = {"XLA_FLAGS": "--xla_cpu_use_onednn=true"}
  assert xla_cpu.apply(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_use_onednn=true " + xla_cpu.FLAG
  assert not xla_cpu.apply(env)  # idempotent
  env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
  assert not xla_cpu.apply(env) and env["XLA_FLAGS"].endswith("individual_dot")
  env = {"VQGAN_JAX_DEFAULT_XLA_FLAGS": "0"}
  assert not xla_cpu.apply(env) and "XLA_FLAGS" not in env
  monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: "0.0.1")  # unmeasured version
  env = {}
  assert not xla_cpu.apply(env) and "XLA_FLAGS" not in env


def test_importing_the_package_sets_the_flag_for_the_backend():
  """In a fresh interpreter: importing vqgan_jax before JAX starts puts the flag in
  XLA_FLAGS, and the CPU backend then starts and computes with it."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",
                                                          "VQGAN_JAX_DEFAULT_XLA_FLAGS")}
  code = ("import os, vqgan_jax, jax.numpy as jnp; "
          "print(repr(os.environ.get('XLA_FLAGS'))); print(float(jnp.arange(4.).sum()))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
  flags_line, value = out.strip().splitlines()[-2:]
  if xla_cpu._jaxlib_version() in xla_cpu.MEASURED_JAXLIB_VERSIONS:  # pylint: disable=protected-access
    assert xla_cpu.FLAG in flags_line
  assert float(value) == 6.0
