"""Analytic FLOP counts (vqgan_jax.flops) against XLA's cost analysis of the compiled code.

XLA's `cost_analysis()` (a dict on jax 0.10; older versions returned a list with one dict
per program, handled below) counts every HLO op, elementwise ones included, and counts
convolutions over their valid (non-padding) taps only. The analytic counts take the
contractions alone, so the two agree to a few per cent on these configs; 10% is the bound.
Everything here compiles but nothing runs.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

from vqgan_jax import flops
from vqgan_jax.models.discriminator import NLayerDiscriminator
from vqgan_jax.models.lpips import LPIPS
from vqgan_jax.models.transformer import GPT
from vqgan_jax.models.vqgan import VQModel

TOL = 0.10

VQ_KW = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=32,
             z_channels=64, embed_dim=64, n_embed=128)
GPT_KW = dict(vocab_size=1024, n_layer=2, n_head=4, n_embd=256)


def xla_flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # jax < 0.4.3x: one dict per HLO module
    analysis = analysis[0]
  return float(analysis["flops"])


def assert_close(xla: float, analytic: int):
  assert analytic > 0
  ratio = xla / analytic
  assert abs(ratio - 1.0) <= TOL, f"XLA {xla:.4g} vs analytic {analytic:.4g} (ratio {ratio:.3f})"


def test_cost_analysis_is_a_dict_with_flops():
  analysis = jax.jit(lambda a, b: a @ b).lower(jnp.ones((8, 16)), jnp.ones((16, 4))).compile(
  ).cost_analysis()
  assert isinstance(analysis, dict)
  assert analysis["flops"] == 2 * 8 * 16 * 4


def test_primitives():
  assert flops.conv_flops(2, 4, 4, 3, 3, 8, 16) == 2 * 2 * 16 * 9 * 8 * 16
  assert flops.dense_flops(10, 3, 5) == 300
  assert flops.attention_flops(1, 4, 6, 8) == 2 * (2 * 4 * 6 * 8)
  # VGG16's conv stack at 224x224 is the well-known ~15.35 GMACs.
  assert abs(flops.vgg16_features_flops(1, 224) / 2 - 15.35e9) / 15.35e9 < 0.01


def test_gpt_non_attention_flops_are_2n_per_token():
  """Dense FLOPs per token = 2 x (non-embedding, non-norm, non-bias parameters)."""
  e, v, layers = 512, 1024, 8
  parts = flops.gpt_forward_breakdown(1, 1, vocab_size=v, n_layer=layers, n_embd=e)
  assert parts["qkv_proj"] + parts["mlp"] + parts["head"] == 2 * (layers * 12 * e * e + e * v)


@pytest.mark.parametrize("image_size", [32, 64])
def test_vqgan_forward_matches_xla(image_size):
  model = VQModel(**VQ_KW)
  x = jnp.zeros((2, image_size, image_size, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  xla = xla_flops(lambda p, x: model.apply(p, x), params, x)
  assert_close(xla, flops.vqgan_forward_flops(2, image_size, **VQ_KW))


def test_vqgan_breakdown_config_helper():
  cfg = ml_collections.ConfigDict(dict(VQ_KW, in_channels=3, out_ch=3, codebook_dim=0))
  assert flops.vqgan_forward_flops_from_config(cfg, 2, 32) == flops.vqgan_forward_flops(
      2, 32, **VQ_KW)
  parts = flops.vqgan_forward_breakdown(2, 32, **VQ_KW)
  assert parts["quantizer_distance"] == 2 * (2 * 8 * 8) * 64 * 128
  assert parts["quantizer_projections"] == 0


def test_vqgan_gradient_step_matches_xla():
  """The generator part of the stage-1 step rule: 3 x forward - conv_in input grad,
  distance matmul forward only."""
  model = VQModel(**VQ_KW)
  x = jnp.zeros((2, 64, 64, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), x)

  def grads(p, x):
    def loss(p):
      out = model.apply(p, x)
      return jnp.mean((out["x_rec"] - x) ** 2) + out["q_loss"]
    return jax.grad(loss)(p)

  parts = flops.stage1_train_step_breakdown(2, 64, VQ_KW, perceptual=False)
  assert_close(xla_flops(grads, params, x), parts["generator"])


def test_lpips_and_discriminator_forward_match_xla():
  x = jnp.zeros((2, 64, 64, 3))
  lpips = LPIPS()
  lp = jax.eval_shape(lpips.init, jax.random.key(0), x, x)
  assert_close(xla_flops(lambda p, a, b: lpips.apply(p, a, b), lp, x, x),
               flops.lpips_forward_flops(2, 64))
  # 4x4 kernels with padding 1 on small maps: XLA skips the padding taps, so the maps
  # must be large enough for the border to matter little (64 px gives 0.89).
  x = jnp.zeros((2, 128, 128, 3))
  disc = NLayerDiscriminator(ndf=32, n_layers=3, norm="none")
  dp = jax.eval_shape(disc.init, jax.random.key(0), x)
  assert_close(xla_flops(lambda p, a: disc.apply(p, a), dp, x),
               flops.discriminator_forward_flops(2, 128, ndf=32, n_layers=3))


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_gpt_forward_and_train_step_match_xla(attention):
  model = GPT(block_size=128, attention=attention, linear_chunk_size=32, **GPT_KW)
  tokens = jnp.zeros((2, 128), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)
  kw = dict(GPT_KW, attention=attention, linear_chunk_size=32)
  assert_close(xla_flops(lambda p, t: model.apply(p, t), params, tokens),
               flops.gpt_forward_flops(2, 128, **kw))

  tx = optax.adam(1e-3)
  opt_state = jax.eval_shape(tx.init, params)

  def train_step(p, o, t):
    def loss(p):
      logits = model.apply(p, t[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]).mean()
    g = jax.grad(loss)(p)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o

  tokens = jnp.zeros((2, 129), jnp.int32)
  assert_close(xla_flops(train_step, params, opt_state, tokens),
               flops.gpt_train_step_flops(2, 128, **kw))


def test_gpt_decode_step_matches_xla():
  model = GPT(block_size=128, **GPT_KW)
  tokens = jnp.zeros((2, 1), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)
  cache = model.init_cache(2, 128)
  fn = lambda p, t, c: model.apply(p, t, jnp.int32(5), c, method=GPT.decode_step)
  assert_close(xla_flops(fn, params, tokens, cache),
               flops.gpt_decode_step_flops(2, 128, **GPT_KW))
