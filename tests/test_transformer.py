"""GPT: parameter count, KV-cache decoding == full forward, causality, dropout, remat, dtype."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax.models.attention import causal_query_blocks, causal_softmax_attention
from vqgan_jax.models.transformer import GPT, count_params, gpt_param_count

CFG = dict(vocab_size=64, block_size=40, n_layer=2, n_head=2, n_embd=32)
T = 13


def random_params(model, seed=0, scale=0.3):
  """Parameters drawn with numpy from the model's shapes: cheaper than a compiled init, and
  larger than the init scale so that attention is far from uniform and wpe is non-zero
  (which would hide cache/position bugs)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    base = 1.0 if path[-1].key == "scale" else 0.0
    return jnp.asarray(base + scale * rng.standard_normal(s.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


class _Setup:
  """One model, its params and jitted entry points per attention kind."""

  def __init__(self, attention):
    self.model = GPT(**CFG, attention=attention, linear_chunk_size=4)
    self.params = random_params(self.model)
    self.forward = jax.jit(self.model.apply)
    self.prefill = jax.jit(lambda p, x, c: self.model.apply(p, x, c, method=GPT.prefill))
    self.step = jax.jit(lambda p, x, pos, c: self.model.apply(p, x, pos, c,
                                                              method=GPT.decode_step))


@pytest.fixture(scope="module", params=["softmax", "linear"])
def setup(request):
  return _Setup(request.param)


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(2).integers(0, CFG["vocab_size"], (2, T)), jnp.int32)


def test_param_count_matches_formula():
  for cfg in (CFG, dict(vocab_size=100, block_size=17, n_layer=3, n_head=4, n_embd=48)):
    for attention in ("softmax", "linear"):
      shapes = jax.eval_shape(GPT(**cfg, attention=attention).init, jax.random.key(0),
                              jnp.zeros((1, 4), jnp.int32))
      assert count_params(shapes) == gpt_param_count(cfg["vocab_size"], cfg["block_size"],
                                                     cfg["n_layer"], cfg["n_embd"])


def test_param_tree_names():
  shapes = jax.eval_shape(GPT(**CFG).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  p = shapes["params"]
  assert set(p) == {"wte", "wpe", "blocks_0", "blocks_1", "ln_f", "head"}
  assert p["wpe"].shape == (40, 32) and p["wte"]["embedding"].shape == (64, 32)
  assert set(p["blocks_0"]) == {"ln1", "attn", "ln2", "mlp"}
  assert set(p["blocks_0"]["attn"]) == {"query", "key", "value", "proj"}
  assert set(p["blocks_0"]["mlp"]) == {"fc", "proj"}
  assert p["blocks_0"]["mlp"]["fc"]["kernel"].shape == (32, 128)
  assert set(p["head"]) == {"kernel"}


def test_init_statistics():
  params = jax.jit(GPT(**CFG).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  assert np.all(np.asarray(params["wpe"]) == 0)
  assert abs(float(jnp.std(params["wte"]["embedding"])) - 0.02) < 0.003
  assert abs(float(jnp.std(params["blocks_0"]["mlp"]["fc"]["kernel"])) - 0.02) < 0.003
  assert np.all(np.asarray(params["blocks_0"]["attn"]["query"]["bias"]) == 0)
  assert np.all(np.asarray(params["ln_f"]["scale"]) == 1)


def test_cache_decoding_matches_full_forward(setup, tokens):
  full = setup.forward(setup.params, tokens)
  assert full.shape == (2, T, CFG["vocab_size"]) and full.dtype == jnp.float32
  cache = setup.model.init_cache(2, T)
  logits, cache = setup.prefill(setup.params, tokens[:, :5], cache)
  outs = [logits]
  # A second prefill starts at a non-zero cache index (chunked prompt processing).
  logits, cache = setup.prefill(setup.params, tokens[:, 5:8], cache)
  outs.append(logits)
  for t in range(8, T):
    logits, cache = setup.step(setup.params, tokens[:, t:t + 1], jnp.int32(t), cache)
    outs.append(logits[:, None])
  assert int(cache["index"]) == T
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-4, rtol=0)


def test_cache_for_another_batch_size_is_refused(tokens):
  model = GPT(**CFG)
  params = random_params(model)
  cache = model.init_cache(1, T)
  with pytest.raises(ValueError, match="init_cache for this batch"):
    model.apply(params, tokens[:, :5], cache, method=GPT.prefill)


def test_causality(setup, tokens):
  t = 7
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % CFG["vocab_size"])
  a = setup.forward(setup.params, tokens)
  b = setup.forward(setup.params, changed)
  np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
  assert np.abs(np.asarray(a[:, t:] - b[:, t:])).max() > 1e-3


def test_dropout_only_in_train_mode(tokens):
  model = GPT(**dict(CFG, n_layer=1), embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)
  params = random_params(model, scale=0.05)
  apply = jax.jit(lambda p, x, k: (model.apply(p, x),
                                   model.apply(p, x, train=True, rngs={"dropout": k}),
                                   GPT(**dict(CFG, n_layer=1)).apply(p, x)))
  evaluate = lambda: apply(params, tokens, jax.random.key(0))[0]
  train = lambda k: apply(params, tokens, jax.random.key(k))[1]
  np.testing.assert_array_equal(evaluate(), evaluate())
  no_dropout = apply(params, tokens, jax.random.key(0))[2]
  np.testing.assert_allclose(evaluate(), no_dropout, atol=1e-6)
  np.testing.assert_array_equal(train(1), train(1))
  assert np.abs(np.asarray(train(1) - train(2))).max() > 1e-4
  assert np.abs(np.asarray(train(1) - evaluate())).max() > 1e-4
  with pytest.raises(ValueError):
    jax.eval_shape(GPT(**CFG, attention="linear", attn_pdrop=0.1).init, jax.random.key(0),
                   tokens)


def test_remat_matches_plain(tokens):
  cfg = dict(CFG, n_layer=1, resid_pdrop=0.1, attn_pdrop=0.1)
  plain, remat = GPT(**cfg), GPT(**cfg, remat=True)
  params = random_params(plain, scale=0.05)
  rngs = {"dropout": jax.random.key(3)}  # same masks with and without remat
  loss = lambda m: lambda p: jnp.mean(m.apply(p, tokens, train=True, rngs=rngs) ** 2)
  both = jax.jit(lambda p: (jax.value_and_grad(loss(plain))(p),
                            jax.value_and_grad(loss(remat))(p)))
  (la, ga), (lb, gb) = both(params)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), ga, gb)


def test_bfloat16_compute_keeps_float32_params_and_logits(tokens):
  model = GPT(**dict(CFG, n_layer=1), dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))
  logits = jax.jit(model.apply)(random_params(model), tokens)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))


@pytest.mark.parametrize("t", [200, 256, 301])
def test_blocked_causal_attention_equals_dot_product_attention(t):
  blocks = causal_query_blocks(t)
  assert blocks[0][0] == 0 and blocks[-1][1] == t and 1 < len(blocks) <= 8
  assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
  q, k, v, w = (jax.random.normal(key, (2, t, 2, 8))
                for key in jax.random.split(jax.random.key(t), 4))
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_allclose(causal_softmax_attention(q, k, v), ref(q, k, v), atol=2e-6)
  ours = jax.grad(loss(causal_softmax_attention), argnums=(0, 1, 2))(q, k, v)
  theirs = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, atol=1e-5)
