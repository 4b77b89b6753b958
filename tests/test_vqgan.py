"""Stage-1 model: shapes, parameter counts, quantizer, adaptive GAN weight, gating."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vqgan_default
from vqgan_jax import losses
from vqgan_jax.models.discriminator import NLayerDiscriminator
from vqgan_jax.models.layers import Downsample, Upsample
from vqgan_jax.models.quantizer import VectorQuantizer
from vqgan_jax.models.vqgan import Decoder, Encoder, VQModel


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_reference_parameter_counts_and_shapes():
  key = jax.random.PRNGKey(0)
  x = jnp.zeros((1, 256, 256, 3))
  encoder = jax.eval_shape(lambda: Encoder().init(key, x))
  decoder = jax.eval_shape(lambda: Decoder().init(key, jnp.zeros((1, 16, 16, 256))))
  disc = jax.eval_shape(lambda: NLayerDiscriminator().init(key, x))
  assert count(encoder) == 29_298_176
  assert count(decoder) == 42_449_795
  assert count(disc["params"]) == 2_765_633
  z = jax.eval_shape(lambda: Encoder().apply(Encoder().init(key, x), x))
  assert z.shape == (1, 16, 16, 256)
  logits = jax.eval_shape(
      lambda: NLayerDiscriminator().apply(NLayerDiscriminator().init(key, x), x,
                                          mutable=["batch_stats"])[0])
  assert logits.shape == (1, 30, 30, 1)


def test_downsample_pads_right_and_bottom_only():
  layer = Downsample()
  x = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1)
  params = layer.init(jax.random.PRNGKey(0), x)
  kernel = jnp.zeros((3, 3, 1, 1)).at[0, 0, 0, 0].set(1.0)  # picks the window's top-left
  out = layer.apply({"params": {"conv": {"kernel": kernel, "bias": jnp.zeros(1)}}}, x)
  assert out.shape == (2, 3, 3, 1)
  np.testing.assert_allclose(out[..., 0], x[:, ::2, ::2, 0])  # no padding on top/left
  up = Upsample()
  assert up.apply(up.init(jax.random.PRNGKey(0), out), out).shape == (2, 6, 6, 1)
  del params


@pytest.fixture(scope="module")
def quantizer_setup():
  vq = VectorQuantizer(n_embed=16, embed_dim=4, beta=0.25, legacy=True)
  z = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 3, 4))
  params = vq.init(jax.random.PRNGKey(0), z)["params"]
  return vq, z, params


def test_quantizer_picks_nearest_code_and_init_range(quantizer_setup):
  vq, z, params = quantizer_setup
  codes = params["embedding"]
  assert codes.shape == (16, 4)
  assert float(jnp.max(jnp.abs(codes))) <= 1.0 / 16
  z_q, _, info = vq.apply({"params": params}, z)
  flat = np.asarray(z).reshape(-1, 4)
  expected = np.argmin(((flat[:, None] - np.asarray(codes)[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(np.asarray(info["indices"]).reshape(-1), expected)
  np.testing.assert_allclose(np.asarray(z_q).reshape(-1, 4), np.asarray(codes)[expected], atol=1e-6)


def test_straight_through_gradient(quantizer_setup):
  vq, z, params = quantizer_setup
  weights = jax.random.normal(jax.random.PRNGKey(2), z.shape)
  grad = jax.grad(lambda z: jnp.sum(vq.apply({"params": params}, z)[0] * weights))(z)
  np.testing.assert_allclose(grad, weights, atol=1e-6)  # identity through the quantizer


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_loss_placements(quantizer_setup, legacy):
  _, z, params = quantizer_setup
  beta = 0.25
  vq = VectorQuantizer(n_embed=16, embed_dim=4, beta=beta, legacy=legacy)

  def loss_fn(z, codes):
    return vq.apply({"params": {"embedding": codes}}, z)[1]

  codes = params["embedding"]
  loss, (gz, gcodes) = jax.value_and_grad(loss_fn, argnums=(0, 1))(z, codes)
  z_q = vq.apply({"params": params}, z)[0]
  mse = float(jnp.mean((z_q - z) ** 2))
  np.testing.assert_allclose(loss, (1 + beta) * mse, rtol=1e-5)
  # Encoder side: d/dz of w_enc * mean((sg(z_q) - z)^2) = -2 w_enc (z_q - z) / N.
  w_enc, w_code = (1.0, beta) if legacy else (beta, 1.0)
  n = z.size
  np.testing.assert_allclose(gz, -2 * w_enc * (z_q - z) / n, rtol=1e-4, atol=1e-7)
  # Codebook side: gradient reaches codes with weight w_code.
  total_code_grad = float(jnp.sum(gcodes * 0 + gcodes))
  np.testing.assert_allclose(total_code_grad, float(jnp.sum(2 * w_code * (z_q - z) / n)),
                             rtol=1e-4, atol=1e-7)


def test_low_dim_l2_lookup_and_index_api():
  model = VQModel(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
                  z_channels=32, embed_dim=32, n_embed=64, codebook_dim=4, l2_normalize=True)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3), minval=-1, maxval=1)
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  assert params["quantize"]["embedding"].shape == (64, 4)
  codebook = model.apply({"params": params}, method=VQModel.codebook)
  np.testing.assert_allclose(jnp.linalg.norm(codebook, axis=-1), 1.0, rtol=1e-5)
  out = model.apply({"params": params}, x)
  indices = model.apply({"params": params}, x, method=VQModel.encode_to_indices)
  assert indices.shape == (2, 8, 8) and indices.dtype == jnp.int32
  np.testing.assert_array_equal(indices, out["indices"])
  decoded = model.apply({"params": params}, indices, method=VQModel.decode_indices)
  np.testing.assert_allclose(decoded, out["x_rec"], atol=1e-5)


def test_adaptive_weight_matches_independent_gradients():
  """lambda from the trainer's one-backward trick equals norms of direct jax.grad."""
  from vqgan_jax.training import stage1 as stage1_trainer
  config = tiny_config()
  config.loss.perceptual_weight = 0.0
  setup = stage1_trainer.Stage1Setup(config)
  state = setup.init_state(jax.random.PRNGKey(0))
  x = jax.random.uniform(jax.random.PRNGKey(3), (2, 16, 16, 3), minval=-1, maxval=1)
  rng = jax.random.PRNGKey(5)
  metrics = jax.jit(lambda p, t: setup.generator_gradients(p, t, x, None, rng, True)[3])(
      state.g_params, state.trainer)

  def recon(kernel):
    params = jax.tree_util.tree_map(lambda a: a, state.g_params)
    params["decoder"]["conv_out"]["kernel"] = kernel
    return setup.model.apply({"params": params}, x, train=True, rngs={"dropout": rng})["x_rec"]

  kernel = state.g_params["decoder"]["conv_out"]["kernel"]
  nll_grad = jax.jit(jax.grad(lambda k: losses.pixel_loss(x, recon(k))))(kernel)
  g_grad = jax.jit(jax.grad(lambda k: -jnp.mean(setup._disc_apply(
      state.trainer.d_params, state.trainer.d_batch_stats, recon(k))[0])))(kernel)
  expected = np.linalg.norm(nll_grad) / (np.linalg.norm(g_grad) + 1e-4)
  expected = np.clip(expected, 0, 1e4) * config.loss.disc_weight
  np.testing.assert_allclose(metrics["d_weight"], expected, rtol=1e-4)


def test_adaptive_weight_clamp_and_stop_gradient():
  w = losses.adaptive_weight(jnp.ones(4) * 1e3, jnp.zeros(4), 0.5)
  np.testing.assert_allclose(w, 1e4 * 0.5)
  grad = jax.grad(lambda a: losses.adaptive_weight(a * jnp.ones(3), jnp.ones(3), 1.0))(2.0)
  assert float(grad) == 0.0


def test_discriminator_losses():
  real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.0])
  np.testing.assert_allclose(losses.hinge_d_loss(real, fake), 0.5 * (0.25 + 0.5))
  expected = 0.5 * (np.mean(np.log1p(np.exp(-np.array([2.0, 0.5]))))
                    + np.mean(np.log1p(np.exp(np.array([-2.0, 0.0])))))
  np.testing.assert_allclose(losses.vanilla_d_loss(real, fake), expected, rtol=1e-6)


def tiny_config():
  config = vqgan_default.get_config()
  m = config.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 32, (1, 2), 1, (8,)
  m.resolution, m.z_channels, m.embed_dim, m.n_embed = 16, 32, 32, 32
  config.loss.disc_ndf, config.loss.disc_start, config.loss.disc_num_layers = 8, 2, 2
  config.data.image_size = 16
  config.batch_size = 2
  config.learning_rate = 1e-3
  return config


@pytest.fixture(scope="module")
def gating_setup():
  from vqgan_jax.training import stage1 as stage1_trainer
  config = tiny_config()
  config.loss.perceptual_weight = 0.0
  setup = stage1_trainer.Stage1Setup(config)
  state = setup.init_state(jax.random.PRNGKey(0))
  batch = {"image": jax.random.uniform(jax.random.PRNGKey(3), (2, 16, 16, 3), minval=-1, maxval=1)}
  steps = {g: jax.jit(functools.partial(setup.train_step, use_gan=g)) for g in (False, True)}
  return setup, state, batch, steps


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                   jax.tree_util.tree_leaves(b)))


def test_disc_start_gates_both_gan_terms(gating_setup):
  from vqgan_jax.training import stage1 as stage1_trainer
  setup, state, batch, steps = gating_setup
  # Before disc_start: no GAN terms, the discriminator does not move.
  assert not stage1_trainer.gan_active(setup.config, 1)
  assert stage1_trainer.gan_active(setup.config, 2)
  before, metrics = steps[False](state, batch, None)
  assert "g_loss" not in metrics and "d_loss" not in metrics
  assert _leaves_equal(state.trainer.d_params, before.trainer.d_params)
  assert _leaves_equal(state.trainer.d_opt_state, before.trainer.d_opt_state)
  # After: both networks get the GAN gradients.
  after, metrics_gan = steps[True](state, batch, None)
  assert "g_loss" in metrics_gan and "d_loss" in metrics_gan
  assert not _leaves_equal(state.trainer.d_params, after.trainer.d_params)
  assert not _leaves_equal(before.g_params, after.g_params)
  # With disc_factor 0 the GAN step's generator update equals the reconstruction-only one.
  zero = tiny_config()
  zero.loss.perceptual_weight, zero.loss.disc_factor = 0.0, 0.0
  zero_setup = stage1_trainer.Stage1Setup(zero)
  gated, _ = jax.jit(functools.partial(zero_setup.train_step, use_gan=True))(state, batch, None)
  for a, b in zip(jax.tree_util.tree_leaves(before.g_params), jax.tree_util.tree_leaves(gated.g_params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert _leaves_equal(state.trainer.d_params, gated.trainer.d_params)


def test_nonfinite_step_is_skipped(gating_setup):
  setup, state, batch, steps = gating_setup
  bad = {"image": batch["image"].at[0, 0, 0, 0].set(jnp.nan)}
  new_state, metrics = steps[False](state, bad, None)
  assert not bool(metrics["finite"])
  assert int(new_state.trainer.nonfinite_steps) == 1
  assert int(new_state.trainer.step) == int(state.trainer.step) + 1
  for a, b in zip(jax.tree_util.tree_leaves(state.g_params), jax.tree_util.tree_leaves(new_state.g_params)):
    np.testing.assert_array_equal(a, b)
