"""The stage-1 step's training order: on which reconstruction the discriminator trains.

Reference order (the default): the discriminator's gradient is that of its loss on the
reconstruction of the generator *after* this step's update (a second forward pass).
loss.disc_on_stale_reconstructions=True: on the reconstruction from before the update.
Before disc_start (use_gan=False) the two orders are the same program and the
discriminator does not move.

The discriminator's optimiser is replaced by one that keeps the gradient it is given as
its state and changes nothing, so the step's discriminator gradient is read back exactly
from `d_opt_state` and compared with one computed here from the step's own generator
parameters. Tiny f = 1 VQGANs with a 2-layer discriminator; the cost is compilation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from vqgan_jax.models import vqgan
from vqgan_jax.training import stage1 as stage1_trainer


pytestmark = pytest.mark.usefixtures("fast_prng")  # tests/conftest.py


def order_config(stale: bool, disc_start: int = 0):
  config = helpers.tiny_stage1_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  config.loss.disc_num_layers, config.loss.disc_ndf = 2, 8
  config.loss.disc_start = disc_start
  config.loss.disc_on_stale_reconstructions = stale
  # A large step makes the updated generator's reconstruction clearly differ from the
  # pre-update one, so that the two orders' discriminator gradients can be told apart.
  config.learning_rate = 3e-2
  return config


def recording_tx() -> optax.GradientTransformation:
  """An 'optimiser' that keeps the last gradient as its state and applies no update."""
  zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)  # pylint: disable=unnecessary-lambda-assignment
  return optax.GradientTransformation(init=zeros,
                                      update=lambda grads, state, params=None: (zeros(grads),
                                                                                grads))


def make_setup(config):
  setup = stage1_trainer.Stage1Setup(config)
  setup.d_tx = recording_tx()
  return setup


def batch_of(config, seed=0):
  rng = np.random.default_rng(seed)
  size = config.data.image_size
  return {"image": rng.uniform(-1, 1, (config.batch_size, size, size, 3)).astype(np.float32)}


def hand_disc_gradient(setup, d_params, d_batch_stats, x, g_params):
  """Gradient of disc_factor * hinge loss, the fake images being g_params' reconstruction
  in a training forward (the model has no dropout here)."""
  x_rec = setup.model.apply(vqgan.as_variables(g_params), x, train=True)["x_rec"]

  def logits(d_params, images):
    out, _ = setup.disc.apply({"params": d_params, "batch_stats": d_batch_stats}, images,
                              train=True, mutable=["batch_stats"])
    return out

  def loss(d_params):
    real, fake = logits(d_params, x), logits(d_params, x_rec)
    hinge = 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))
    return setup.config.loss.disc_factor * hinge

  return jax.grad(loss)(d_params)


@functools.lru_cache(maxsize=None)
def one_step(stale: bool):
  """(setup, state before, state after, metrics) of one GAN step in the given order."""
  config = order_config(stale)
  setup = make_setup(config)
  state = jax.jit(setup.init_state)(setup.rng)
  step = jax.jit(functools.partial(setup.train_step, use_gan=True))
  new_state, metrics = step(state, batch_of(config), None)
  return setup, state, new_state, metrics


def _assert_trees_close(a, b, **kw):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def _max_rel_diff(a, b):
  diffs = [np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12)
           for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
  return max(diffs)


@pytest.mark.parametrize("stale", [False, True])
def test_discriminator_gradient_follows_the_order(stale):
  setup, before, after, metrics = one_step(stale)
  assert bool(metrics["finite"])
  x = jnp.asarray(batch_of(setup.config)["image"])
  d_grad = jax.device_get(after.trainer.d_opt_state)  # recording_tx: the step's gradient
  hand = jax.jit(hand_disc_gradient, static_argnums=0)
  on_updated = jax.device_get(hand(setup, before.trainer.d_params, before.trainer.d_batch_stats,
                                   x, after.g_params))
  on_stale = jax.device_get(hand(setup, before.trainer.d_params, before.trainer.d_batch_stats,
                                 x, before.g_params))
  # The two candidate gradients must differ by far more than the tolerance, else the
  # test could not tell the orders apart.
  assert _max_rel_diff(on_updated, on_stale) > 1e-2
  expected, other = (on_stale, on_updated) if stale else (on_updated, on_stale)
  _assert_trees_close(d_grad, expected, rtol=1e-4, atol=1e-6)
  assert _max_rel_diff(d_grad, other) > 1e-2
  # The discriminator's optimiser applied nothing; its BatchNorm statistics moved.
  _assert_trees_close(after.trainer.d_params, before.trainer.d_params, rtol=0, atol=0)


def test_the_generator_update_does_not_depend_on_the_order():
  _, _, updated, m_updated = one_step(False)
  _, _, stale, m_stale = one_step(True)
  _assert_trees_close(updated.g_params, stale.g_params, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m_updated["total_loss"], m_stale["total_loss"], rtol=1e-6)


def test_before_disc_start_orders_are_one_program_and_the_discriminator_stays():
  lowered = {}
  for stale in (False, True):
    config = order_config(stale, disc_start=10 ** 9)
    setup = stage1_trainer.Stage1Setup(config)  # the real Adam
    use_gan = stage1_trainer.gan_active(config, 0)
    assert not use_gan
    state = jax.jit(setup.init_state)(setup.rng)
    step = jax.jit(functools.partial(setup.train_step, use_gan=use_gan))
    lowered[stale] = (step.lower(state, batch_of(config), None), state)
  # The same program in both modes: before disc_start neither order costs anything.
  assert lowered[False][0].as_text() == lowered[True][0].as_text()
  compiled, state = lowered[False][0].compile(), lowered[False][1]
  new_state, metrics = compiled(state, batch_of(order_config(False)), None)
  assert bool(metrics["finite"]) and "d_loss" not in metrics
  for name in ("d_params", "d_batch_stats", "d_opt_state"):
    _assert_trees_close(getattr(new_state.trainer, name), getattr(state.trainer, name),
                        rtol=0, atol=0)
  assert _max_rel_diff(new_state.g_params, state.g_params) > 0
