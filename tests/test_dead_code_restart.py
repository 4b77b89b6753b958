"""Dead-code restart (model.restart_dead_codes): distinct replacement latents, and the
restarted rows' Adam moments reset while every other optimiser statistic stays.

`Stage1Setup._restart_dead_codes` is tested on small hand-made trees (no model), with
the stage-1 optimiser with and without gradient clipping (an optax chain either way),
and then once inside a real training step against the same step without restarts.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from vqgan_jax.training import stage1 as stage1_trainer

CODES, DIM = 32, 8


def restart_config(clip: float = 0.0):
  config = helpers.tiny_stage1_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  config.model.n_embed = CODES
  config.model.restart_dead_codes = True
  config.loss.disc_num_layers, config.loss.disc_ndf = 2, 8
  config.grad_clip_norm = clip
  return config


def moments(opt_state):
  """The ScaleByAdamState inside the stage-1 optimiser's state (a chain, maybe nested)."""
  found = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
  assert len(found) == 1
  return found[0]


def hand_made(setup, seed=0):
  """Params with a codebook and a same-shaped non-codebook leaf, and an Adam state whose
  moments are non-zero everywhere (two updates with random gradients)."""
  rng = np.random.default_rng(seed)
  params = {"quantize": {"embedding": jnp.asarray(rng.normal(size=(CODES, DIM)), jnp.float32)},
            # Same shape as the codebook but another path: its moments must stay.
            "decoder": {"embedding": jnp.asarray(rng.normal(size=(CODES, DIM)), jnp.float32)}}
  opt_state = setup.g_tx.init(params)
  for _ in range(2):
    grads = jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    _, opt_state = setup.g_tx.update(grads, opt_state, params)
  return params, opt_state


def _rows(a):
  return [tuple(np.asarray(r).tolist()) for r in a]


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_restart_resets_moments_of_restarted_rows_only(clip):
  setup = stage1_trainer.Stage1Setup(restart_config(clip))
  params, opt_state = hand_made(setup)
  dead = np.zeros(CODES, bool)
  dead[[1, 5, 6, 20, 31]] = True
  usage = jnp.asarray(np.where(dead, 0.0, 0.5), jnp.float32)
  z_lookup = jax.random.normal(jax.random.PRNGKey(3), (1, 4, 8, 8, DIM))
  new_params, new_opt, new_usage, restarted = jax.jit(setup._restart_dead_codes)(  # pylint: disable=protected-access
      params, opt_state, usage, z_lookup, jax.random.PRNGKey(4))
  assert int(restarted) == dead.sum()

  old_book = np.asarray(params["quantize"]["embedding"])
  book = np.asarray(new_params["quantize"]["embedding"])
  np.testing.assert_array_equal(book[~dead], old_book[~dead])
  # Each restarted code is one of the batch's latents, and no two are the same.
  latents = set(_rows(np.asarray(z_lookup).reshape(-1, DIM)))
  replaced = _rows(book[dead])
  assert set(replaced) <= latents and len(set(replaced)) == len(replaced)
  np.testing.assert_array_equal(new_params["decoder"]["embedding"], params["decoder"]["embedding"])
  np.testing.assert_array_equal(new_usage, np.where(dead, 1.0, usage))

  before, after = moments(opt_state), moments(new_opt)
  np.testing.assert_array_equal(after.count, before.count)  # shared step count: kept
  for name in ("mu", "nu"):
    old, new = getattr(before, name), getattr(after, name)
    row_old, row_new = np.asarray(old["quantize"]["embedding"]), np.asarray(new["quantize"]["embedding"])
    assert np.all(row_old[dead] != 0)
    np.testing.assert_array_equal(row_new[dead], 0.0)
    np.testing.assert_array_equal(row_new[~dead], row_old[~dead])
    np.testing.assert_array_equal(new["decoder"]["embedding"], old["decoder"]["embedding"])
  # Nothing else in the state changed (clipping's state, the chain's other parts).
  flat_old = jax.tree_util.tree_leaves_with_path(opt_state)
  flat_new = dict(jax.tree_util.tree_leaves_with_path(new_opt))
  for path, leaf in flat_old:
    if "'quantize'" not in jax.tree_util.keystr(path):
      np.testing.assert_array_equal(flat_new[path], leaf)


def test_all_codes_dead_take_a_permutation_of_as_many_latents():
  """32 dead codes, 32 latent positions: every latent is used exactly once (drawing with
  replacement, as before, would repeat some with probability 1 - 32!/32**32)."""
  setup = stage1_trainer.Stage1Setup(restart_config())
  params, opt_state = hand_made(setup, seed=1)
  z_lookup = jax.random.normal(jax.random.PRNGKey(5), (1, 2, 4, 4, DIM))
  usage = jnp.zeros((CODES,), jnp.float32)
  new_params, _, _, restarted = jax.jit(setup._restart_dead_codes)(  # pylint: disable=protected-access
      params, opt_state, usage, z_lookup, jax.random.PRNGKey(6))
  assert int(restarted) == CODES
  assert sorted(_rows(new_params["quantize"]["embedding"])) == sorted(
      _rows(np.asarray(z_lookup).reshape(-1, DIM)))


def test_fewer_latents_than_dead_codes_restart_as_many_as_there_are_latents():
  setup = stage1_trainer.Stage1Setup(restart_config())
  params, opt_state = hand_made(setup, seed=2)
  z_lookup = jax.random.normal(jax.random.PRNGKey(7), (1, 1, 1, 3, DIM))  # 3 latents
  dead = np.zeros(CODES, bool)
  dead[:10] = True
  usage = jnp.asarray(np.where(dead, 0.0, 0.5), jnp.float32)
  new_params, new_opt, new_usage, restarted = jax.jit(setup._restart_dead_codes)(  # pylint: disable=protected-access
      params, opt_state, usage, z_lookup, jax.random.PRNGKey(8))
  assert int(restarted) == 3
  book, old = np.asarray(new_params["quantize"]["embedding"]), np.asarray(params["quantize"]["embedding"])
  changed = np.any(book != old, axis=1)
  assert changed.sum() == 3 and not np.any(changed & ~dead)
  assert sorted(_rows(book[changed])) == sorted(_rows(np.asarray(z_lookup).reshape(-1, DIM)))
  # The dead codes that waited keep their usage (still dead: they restart at a later step)
  # and their moments.
  waiting = dead & ~changed
  np.testing.assert_array_equal(np.asarray(new_usage)[waiting], 0.0)
  np.testing.assert_array_equal(np.asarray(new_usage)[changed], 1.0)
  mu_new = np.asarray(moments(new_opt).mu["quantize"]["embedding"])
  mu_old = np.asarray(moments(opt_state).mu["quantize"]["embedding"])
  np.testing.assert_array_equal(mu_new[changed], 0.0)
  np.testing.assert_array_equal(mu_new[~changed], mu_old[~changed])


def with_codebook_moments(opt_state):
  """Adam moments of the codebook as after earlier steps (at init they are zero, and an
  unused code's stay zero: the reset would not show)."""
  def fill(path, leaf):
    names = jax.tree_util.keystr(path)
    if not names.endswith("['quantize']['embedding']"):
      return leaf
    return jnp.full_like(leaf, 1e-2 if ".mu" in names else 1e-4)
  return jax.tree_util.tree_map_with_path(fill, opt_state)


def test_restart_inside_a_training_step():
  """One real step with restarts against the same step without: they differ only in the
  restarted codes, their Adam moments (zero) and their usage estimates (reset to 1)."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "unsafe_rbg")  # faster init compilation
  try:
    results = {}
    for restart in (True, False):
      config = restart_config()
      config.model.restart_dead_codes = restart
      # The usage EMA starts at 1: after one step a code is at 0.99 + 0.01 * hits, so
      # exactly the codes no latent of this batch chose are below 0.995.
      config.model.dead_code_threshold = 0.995
      setup = stage1_trainer.Stage1Setup(config)
      state = jax.jit(setup.init_state)(setup.rng)
      state = state.replace(trainer=state.trainer.replace(
          g_opt_state=with_codebook_moments(state.trainer.g_opt_state)))
      rng = np.random.default_rng(0)
      batch = {"image": rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)}
      step = jax.jit(functools.partial(setup.train_step, use_gan=False))
      results[restart] = jax.device_get(step(state, batch, None))
  finally:
    jax.config.update("jax_default_prng_impl", previous)

  (on, m_on), (off, m_off) = results[True], results[False]
  counts = np.asarray(m_off["code_counts"])
  dead = counts == 0
  assert 0 < dead.sum() < CODES and int(m_on["codes_restarted"]) == dead.sum()
  book_on = np.asarray(on.g_params["quantize"]["embedding"])
  book_off = np.asarray(off.g_params["quantize"]["embedding"])
  np.testing.assert_array_equal(book_on[~dead], book_off[~dead])
  assert np.all(np.any(book_on[dead] != book_off[dead], axis=1))
  assert len(set(_rows(book_on[dead]))) == dead.sum()
  np.testing.assert_array_equal(on.trainer.code_usage_ema[dead], 1.0)
  np.testing.assert_array_equal(on.trainer.code_usage_ema[~dead], off.trainer.code_usage_ema[~dead])
  adam_on, adam_off = moments(on.trainer.g_opt_state), moments(off.trainer.g_opt_state)
  for name in ("mu", "nu"):
    row_on = np.asarray(getattr(adam_on, name)["quantize"]["embedding"])
    row_off = np.asarray(getattr(adam_off, name)["quantize"]["embedding"])
    np.testing.assert_array_equal(row_on[dead], 0.0)
    assert np.all(row_off[dead] != 0)
    np.testing.assert_array_equal(row_on[~dead], row_off[~dead])
    others = lambda tree: {k: v for k, v in tree.items() if k != "quantize"}  # pylint: disable=unnecessary-lambda-assignment
    jax.tree_util.tree_map(np.testing.assert_array_equal, others(getattr(adam_on, name)),
                           others(getattr(adam_off, name)))
