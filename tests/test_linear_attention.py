"""Linear attention: chunked parallel form == recurrent form == naive O(T^2) reference."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax.models.attention import (LinearAttention, naive_linear_attention,
                                        recurrent_linear_attention)
from vqgan_jax.models.transformer import GPT
from vqgan_jax.sampling import sample, sample_naive

B, H, D = 2, 2, 4


def qkv(t, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((B, t, H, D)), jnp.float32) for _ in range(3))


@pytest.fixture(scope="module")
def chunked_fn():
  # chunk_size is static (it shapes the scan), so one compile per (chunk, length).
  return jax.jit(lambda q, k, v, s, c: LinearAttention(chunk_size=c).chunked(q, k, v, s),
                 static_argnums=4)


@pytest.fixture(scope="module")
def recurrent_fn():
  return jax.jit(recurrent_linear_attention)


@pytest.fixture(scope="module")
def naive_fn():
  return jax.jit(naive_linear_attention)


@pytest.mark.parametrize("t", [13, 29])
@pytest.mark.parametrize("chunk", [1, 3, 8, 16])
def test_chunked_equals_recurrent_equals_naive(t, chunk, chunked_fn, recurrent_fn, naive_fn):
  q, k, v = qkv(t)
  reference = naive_fn(q, k, v)
  chunked, state_c = chunked_fn(q, k, v, None, chunk)
  recurrent, state_r = recurrent_fn(q, k, v)
  np.testing.assert_allclose(chunked, reference, atol=1e-4, rtol=0)
  np.testing.assert_allclose(recurrent, reference, atol=1e-4, rtol=0)
  # The carried state ignores the internal padding: it equals the token-by-token state.
  np.testing.assert_allclose(state_c["S"], state_r["S"], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(state_c["z"], state_r["z"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk", [3, 8])
def test_continuation_after_conditioning_prefix(chunk, chunked_fn, recurrent_fn, naive_fn):
  # A prefix (conditioning tokens) is absorbed into the state; the continuation, chunked or
  # recurrent, must equal the naive attention over the whole sequence.
  t, prefix = 29, 7
  q, k, v = qkv(t, seed=1)
  reference = naive_fn(q, k, v)[:, prefix:]
  _, state = chunked_fn(q[:, :prefix], k[:, :prefix], v[:, :prefix], None, chunk)
  rest = (q[:, prefix:], k[:, prefix:], v[:, prefix:])
  np.testing.assert_allclose(chunked_fn(*rest, state, chunk)[0], reference, atol=1e-4, rtol=0)
  np.testing.assert_allclose(recurrent_fn(*rest, 1e-6, state)[0], reference, atol=1e-4, rtol=0)


def test_bfloat16_inputs_keep_float32_state():
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv(13))
  both = jax.jit(lambda q, k, v: (LinearAttention(chunk_size=4).chunked(q, k, v),
                                  naive_linear_attention(q, k, v)))
  (out, state), reference = both(q, k, v)
  assert out.dtype == jnp.bfloat16 and state["S"].dtype == jnp.float32
  np.testing.assert_allclose(out.astype(jnp.float32), reference.astype(jnp.float32), atol=5e-2)


def test_greedy_recurrent_sampling_equals_parallel_decoding():
  # `sample` decodes with the recurrent step after a chunked prefill; `sample_naive` reruns
  # the chunked parallel forward (chunk 3 does not divide the lengths) at every step.
  model = GPT(vocab_size=64, block_size=40, n_layer=2, n_head=2, n_embd=32,
              attention="linear", linear_chunk_size=3)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray((path[-1].key == "scale") + 0.3 * rng.standard_normal(s.shape),
                                  jnp.float32), shapes)
  prefix = jnp.array([[60, 3, 7], [61, 9, 1]], jnp.int32)
  key = jax.random.key(0)
  cached = sample(params, model, prefix, 20, key, temperature=0.0)
  recomputed = sample_naive(params, model, prefix, 20, key, temperature=0.0)
  np.testing.assert_array_equal(cached, recomputed)
  assert len(np.unique(np.asarray(cached))) > 2  # not a degenerate constant sequence
