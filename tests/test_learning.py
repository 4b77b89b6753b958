"""Training learns: quality after a short run, with every loss term of the recipe on.

The other trainer tests check plumbing (checkpoints, resume, metadata) with LPIPS off and
the GAN never started; these run the reference recipe, LPIPS and the adaptive-weight GAN
switched on within the run, and assert what the run is for: reconstructions improve,
both networks move, the adaptive weight is a usable number; and a GPT predicts tokens
far better than their unigram frequencies.
"""

import glob
import os

import jax
import numpy as np
import pytest

import helpers
from configs import transformer_tiny, vqgan_tiny
from vqgan_jax import data, sharding
from vqgan_jax.data import scenes
from vqgan_jax.training import stage1 as stage1_trainer
from vqgan_jax.training import stage2 as stage2_trainer

STEPS, DISC_START = 80, 40


def _max_change(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.slow
def test_stage1_with_lpips_and_gan_learns():
  config = vqgan_tiny.get_config()
  config.loss.perceptual_weight = 1.0
  config.loss.disc_start = DISC_START         # the GAN starts half way through the run
  config.data.photos.photo_short_side = 64
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_eval_batches = 2
  config.learning_rate = 2e-3
  runner = stage1_trainer.Stage1Runner(config)
  state = runner.init_state()

  def evaluate(s):
    return runner.evaluate(s.g_params, stage1_trainer.eval_batches(
        config, runner.mesh, config.eval_batch_size))[0]

  before = evaluate(state)
  batches = data.make_train_iterator(config.data, batch_size=config.batch_size, seed=0)
  g_start = jax.device_get(state.g_params)
  d_start = jax.device_get(state.trainer.d_params)
  weights, d_before_gan = [], None
  for step in range(STEPS):
    if step == DISC_START:
      d_before_gan = jax.device_get(state.trainer.d_params)
    state, metrics = runner.train_step(state, sharding.global_batch(next(batches),
                                                                    runner.mesh), step)
    if step >= DISC_START:
      weights.append(float(metrics["d_weight"]))
      assert np.isfinite(float(metrics["d_loss"])) and np.isfinite(float(metrics["g_loss"]))
    assert np.isfinite(float(metrics["total_loss"])), step
  after = evaluate(state)

  assert after["val_l1"] < 0.8 * before["val_l1"], (before["val_l1"], after["val_l1"])
  assert after["val_lpips"] < before["val_lpips"], (before["val_lpips"], after["val_lpips"])
  assert _max_change(g_start, jax.device_get(state.g_params)) > 1e-3
  # The discriminator stays put before disc_start and trains after it.
  assert _max_change(d_start, d_before_gan) == 0.0
  assert _max_change(d_before_gan, jax.device_get(state.trainer.d_params)) > 1e-4
  assert all(np.isfinite(w) and w > 0 for w in weights), weights


@pytest.mark.slow
def test_stage2_beats_the_unigram_entropy(tmp_path_factory, tmp_path):
  """On the synthetic scenes (sky above, water and grass below: tokens a context predicts)
  a small GPT ends far below the bits per token of the tokens' unigram distribution."""
  stage1_dir = helpers.shared_stage1_workdir(tmp_path_factory)
  root = scenes.write_scene_folder(str(tmp_path / "scenes"), 40, 24, 32, seed=0)
  c = transformer_tiny.get_config()
  c.first_stage.workdir = stage1_dir
  c.async_checkpointing = False
  c.cond.kind, c.cond.cfg_dropout = "none", 0.0
  c.data.name = "seg_folder"
  c.data.seg_folder.folder_path = root
  c.data.seg_folder.val_fraction = 0.2
  c.data.label_maps.num_classes = len(scenes.CLASS_NAMES)
  c.model.n_embd, c.model.n_layer = 64, 2
  c.pkeep = 1.0
  c.batch_size, c.learning_rate = 16, 2e-3
  c.num_train_steps = 200
  c.log_every_steps = 50
  c.eval_every_steps = c.checkpoint_every_steps = 200
  c.num_eval_batches, c.eval_batch_size = 0, 8
  c.unigram_batches = 8
  c.eval_samples = 4
  workdir = str(tmp_path / "gpt")
  metrics = stage2_trainer.train_and_evaluate(c, workdir)
  unigram = metrics["unigram_entropy_bits"]
  assert unigram > 3.0, metrics            # the tokens are varied enough to be a test
  assert metrics["val_bits_per_token"] < 0.8 * unigram, metrics
  # TensorBoard has the GPT's samples of each evaluation (steps 0 and 200).
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (clu's writer needs it anyway)
  steps = []
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "val_samples":
          image = tf.io.decode_image(tf.make_ndarray(value.tensor)[-1]).numpy()
          assert image.shape[0] > 2 * 16 and image.shape[1] > 4 * 16   # 2 rows of 4
          steps.append(event.step)
  assert sorted(steps) == [0, 200], steps
