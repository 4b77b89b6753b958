"""Samplers: logit filters, cached vs recomputed decoding, seeds, sliding window, CFG."""

import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax.models.transformer import GPT
from vqgan_jax.sampling import (filter_logits, sample, sample_from_logits, sample_naive,
                                sample_sliding_window, window_origin)

N_CODES = 48          # image codes [0, 48); ids 48..63 are conditioning ids
NUM = 16              # a 4 x 4 token grid
WIN = 4
# Shared by every model-level call so the samplers compile once per shape (temperature and
# top_p are traced; top_k and num_image_codes are static).
KW = dict(top_k=10, top_p=0.95, num_image_codes=N_CODES)


@pytest.fixture(scope="module")
def model():
  return GPT(vocab_size=64, block_size=40, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def params(model):
  # numpy draws larger than the init scale, so the distributions are far from uniform.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray((path[-1].key == "scale") + 0.3 * rng.standard_normal(s.shape),
                                  jnp.float32), shapes)


@pytest.fixture(scope="module")
def prefix():
  return jnp.array([[60], [61]], jnp.int32)  # e.g. class tokens above the image codes


@pytest.fixture(scope="module")
def key():
  return jax.random.key(42)


def kept(logits):
  return set(np.flatnonzero(np.isfinite(np.asarray(logits))).tolist())


# ----- logit filters ---------------------------------------------------------------------


def test_top_k_keeps_exactly_k():
  logits = jnp.array([1.0, 5.0, 3.0, 2.0, 4.0, 0.5])
  assert kept(filter_logits(logits, top_k=1)) == {1}
  assert kept(filter_logits(logits, top_k=2)) == {1, 4}
  assert kept(filter_logits(logits, top_k=4)) == {1, 4, 2, 3}
  assert kept(filter_logits(logits, top_k=6)) == set(range(6))
  # Kept logits are unchanged.
  np.testing.assert_array_equal(filter_logits(logits, top_k=2)[jnp.array([1, 4])], [5.0, 4.0])
  # Ties with the k-th value are kept.
  assert kept(filter_logits(jnp.array([1.0, 3.0, 3.0, 2.0]), top_k=1)) == {1, 2}


def test_top_p_keeps_smallest_set_with_enough_mass():
  probs = np.array([0.1, 0.5, 0.05, 0.2, 0.15])  # deliberately unsorted
  logits = jnp.log(jnp.asarray(probs))
  assert kept(filter_logits(logits, top_p=0.3)) == {1}              # 0.5 >= 0.3
  assert kept(filter_logits(logits, top_p=0.6)) == {1, 3}           # 0.7
  assert kept(filter_logits(logits, top_p=0.75)) == {1, 3, 4}       # 0.85
  assert kept(filter_logits(logits, top_p=0.9)) == {1, 3, 4, 0}     # 0.95
  assert kept(filter_logits(logits, top_p=0.99)) == set(range(5))
  assert kept(filter_logits(logits, top_p=1e-6)) == {1}             # the argmax survives


def test_top_k_and_top_p_together_and_batched():
  probs = np.array([[0.1, 0.5, 0.05, 0.2, 0.15], [0.3, 0.05, 0.25, 0.1, 0.3]])
  logits = jnp.log(jnp.asarray(probs))
  # top-k first, then top-p on the renormalised survivors: 0.5/0.7 = 0.71 < 0.8.
  assert kept(filter_logits(logits[0], top_k=2, top_p=0.8)) == {1, 3}
  assert kept(filter_logits(logits[0], top_k=3, top_p=0.6)) == {1, 3}
  out = filter_logits(logits, top_k=3, top_p=0.5)
  assert kept(out[0]) == {1} and kept(out[1]) == {0, 4}             # tie kept together


def test_sample_from_logits_greedy_and_image_code_restriction():
  logits = jnp.array([[0.0, 1.0, 2.0, 9.0], [3.0, 0.0, 1.0, 8.0]])  # argmax is id 3
  key = jax.random.key(0)
  np.testing.assert_array_equal(sample_from_logits(logits, key, 0.0), [3, 3])
  np.testing.assert_array_equal(sample_from_logits(logits, key, 0.0, num_image_codes=3), [2, 0])
  draws = jax.jit(jax.vmap(lambda k: sample_from_logits(logits, k, 1.0, num_image_codes=3)))(
      jax.random.split(key, 200))
  assert draws.max() < 3 and draws.dtype == jnp.int32


# ----- plain samplers --------------------------------------------------------------------


def test_greedy_sample_equals_argmax_recompute(model, params, prefix, key):
  cached = sample(params, model, prefix, NUM, key, temperature=0.0, **KW)
  naive = sample_naive(params, model, prefix, NUM, key, temperature=0.0, **KW)
  np.testing.assert_array_equal(cached, naive)
  # Independent check: argmax over the image codes of a full forward, step by step.
  forward = jax.jit(model.apply)
  seq = np.zeros((2, 1 + NUM - 1), np.int32)
  seq[:, 0] = np.asarray(prefix[:, 0])
  expected = []
  for step in range(NUM):
    token = np.argmax(np.asarray(forward(params, jnp.asarray(seq))[:, step, :N_CODES]), -1)
    expected.append(token)
    if step + 1 < seq.shape[1]:
      seq[:, step + 1] = token
  np.testing.assert_array_equal(cached, np.stack(expected, 1))
  # Nucleus sampling with a vanishing top_p keeps only the argmax.
  tiny_p = sample(params, model, prefix, NUM, key, temperature=1.0,
                  **dict(KW, top_p=1e-6))
  np.testing.assert_array_equal(tiny_p, cached)


def test_cached_sample_equals_naive_sample(model, params, prefix, key):
  cached = sample(params, model, prefix, NUM, key, temperature=1.0, **KW)
  naive = sample_naive(params, model, prefix, NUM, key, temperature=1.0, **KW)
  assert cached.shape == (2, NUM) and cached.dtype == jnp.int32
  np.testing.assert_array_equal(cached, naive)
  assert int(cached.max()) < N_CODES and int(cached.min()) >= 0


@pytest.mark.parametrize("batch", [1, 2])
def test_decoding_loop_does_not_copy_the_cache(model, params, prefix, key, batch):
  """The compiled sampler updates each layer's KV cache in place: no copy instruction
  moves an array as large as a cache. (With a (B, H, L, D) cache at batch 1, XLA:CPU
  copied every layer's keys and values four times per decoded token.)"""
  tokens = prefix[:batch]
  cache = model.init_cache(batch, tokens.shape[1] + NUM - 1)
  cache_size = min(x.size for x in jax.tree_util.tree_leaves(cache["layers"]))
  hlo = sample.lower(params, model, tokens, NUM, key, **KW).compile().as_text()
  copied = [_elements(m.group(1)) for m in re.finditer(r"= f32\[([0-9,]*)\]\S* copy\(", hlo)]
  assert "while" in hlo
  assert [n for n in copied if n >= cache_size] == [], copied


def _elements(dims: str) -> int:
  return int(np.prod([int(d) for d in dims.split(",") if d]))


def test_seeds(model, params, prefix):
  draw = lambda seed: np.asarray(sample(params, model, prefix, NUM, jax.random.key(seed),
                                        temperature=1.0, **KW))
  np.testing.assert_array_equal(draw(1), draw(1))
  assert (draw(1) != draw(2)).any()


def test_cfg(model, params, prefix, key):
  uncond = jnp.array([[62]], jnp.int32)  # a "null" condition, broadcast over the batch
  cond = sample(params, model, prefix, NUM, key, temperature=1.0, **KW)
  scale_one = sample(params, model, prefix, NUM, key, temperature=1.0, cfg_scale=1.0,
                     uncond_prefix=uncond, **KW)
  np.testing.assert_array_equal(scale_one, cond)
  # Scale 0 is the unconditional model.
  scale_zero = sample(params, model, prefix, NUM, key, temperature=1.0, cfg_scale=0.0,
                      uncond_prefix=uncond, **KW)
  plain_uncond = sample(params, model, jnp.broadcast_to(uncond, prefix.shape), NUM, key,
                        temperature=1.0, **KW)
  np.testing.assert_array_equal(scale_zero, plain_uncond)
  # A real guidance scale: cached and recomputed agree and codes stay in range.
  guided = sample(params, model, prefix, NUM, key, temperature=1.0, cfg_scale=3.0,
                  uncond_prefix=uncond, **KW)
  naive = sample_naive(params, model, prefix, NUM, key, temperature=1.0, cfg_scale=3.0,
                       uncond_prefix=uncond, **KW)
  np.testing.assert_array_equal(guided, naive)
  assert int(guided.max()) < N_CODES


# ----- sliding window --------------------------------------------------------------------


def _reference_local(i, size, window):
  """The piecewise formula of taming's sliding-window sampler (even windows)."""
  if i <= window // 2:
    return i
  if size - i < window // 2:
    return window - (size - i)
  return window // 2


def test_window_origin_matches_reference_and_stays_in_bounds():
  for size, window in [(8, 4), (10, 4), (16, 16), (9, 6), (7, 3), (9, 5)]:
    for i in range(size):
      top, _ = window_origin(i, 0, size, size, window, window)
      top = int(top)
      assert 0 <= top <= size - window and top <= i < top + window
      if window % 2 == 0:
        assert i - top == _reference_local(i, size, window)


def test_sliding_window_equals_plain_sampler_when_grid_is_window(model, params, prefix, key):
  grid, info = sample_sliding_window(params, model, prefix, WIN, WIN, WIN, WIN, key,
                                     temperature=1.0, return_info=True, **KW)
  plain = sample(params, model, prefix, NUM, key, temperature=1.0, **KW)
  np.testing.assert_array_equal(grid.reshape(2, NUM), plain)
  np.testing.assert_array_equal(info["visits"], np.ones((WIN, WIN)))
  np.testing.assert_array_equal(info["order"].reshape(-1), np.arange(NUM))


def test_sliding_window_on_a_larger_grid(model, params, prefix, key):
  h, w = 2 * WIN, 2 * WIN
  grid, info = sample_sliding_window(params, model, prefix, h, w, WIN, WIN, key,
                                     temperature=1.0, return_info=True, **KW)
  assert grid.shape == (2, h, w) and grid.dtype == jnp.int32
  assert int(grid.min()) >= 0 and int(grid.max()) < N_CODES
  np.testing.assert_array_equal(info["visits"], np.ones((h, w)))          # once each
  np.testing.assert_array_equal(info["order"].reshape(-1), np.arange(h * w))  # raster order
  expected_top = [i - _reference_local(i, h, WIN) for i in range(h) for _ in range(w)]
  expected_left = [j - _reference_local(j, w, WIN) for _ in range(h) for j in range(w)]
  np.testing.assert_array_equal(info["top"], expected_top)
  np.testing.assert_array_equal(info["left"], expected_left)
  # Keyed by raster position: the first window-sized rows agree with the plain sampler
  # as long as the window hasn't moved (positions (0, 0..1) see the same context).
  plain = sample(params, model, prefix, NUM, key, temperature=1.0, **KW)
  np.testing.assert_array_equal(grid[:, 0, :WIN // 2 + 1], plain[:, :WIN // 2 + 1])


@pytest.mark.parametrize("spatial", [False, True])
def test_sliding_window_cache_gives_the_recomputed_grid(model, params, prefix, key, spatial):
  h, w = WIN + 2, 2 * WIN + 1
  cond = None
  if spatial:
    cond = jnp.asarray(np.random.default_rng(3).integers(N_CODES, 60, (2, h, w)), jnp.int32)
  kw = dict(KW, temperature=1.0, spatial_cond=cond, return_info=True)
  cached, info = sample_sliding_window(params, model, prefix, h, w, WIN, WIN, key, **kw)
  plain, plain_info = sample_sliding_window(params, model, prefix, h, w, WIN, WIN, key,
                                            use_cache=False, **kw)
  np.testing.assert_array_equal(cached, plain)
  assert not np.asarray(plain_info["cached"]).any()
  # A position is a cached decoding step iff its window origin equals the previous one's.
  origin = np.stack([info["top"], info["left"]], 1)
  expected = np.concatenate([[False], (origin[1:] == origin[:-1]).all(1)]).reshape(h, w)
  np.testing.assert_array_equal(info["cached"], expected)
  assert 0 < expected.sum() < h * w


def test_sliding_window_with_spatial_condition(model, params, prefix, key):
  spatial = jnp.asarray(np.random.default_rng(7).integers(N_CODES, 60, (2, WIN, WIN)), jnp.int32)
  grid = sample_sliding_window(params, model, prefix, WIN, WIN, WIN, WIN, key,
                               temperature=1.0, spatial_cond=spatial, **KW)
  # grid == window: same as the plain sampler with [cond, flattened spatial grid] as prefix.
  full_prefix = jnp.concatenate([prefix, spatial.reshape(2, -1)], axis=1)
  plain = sample(params, model, full_prefix, NUM, key, temperature=1.0, **KW)
  np.testing.assert_array_equal(grid.reshape(2, NUM), plain)
