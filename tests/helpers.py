"""Shared test helpers: a tiny stage-1 config and a trained (2-step) workdir built from it."""

import os

from configs import vqgan_default


def tiny_stage1_config():
  """A VQGAN small enough to train, evaluate and export in seconds on a 2-core CPU.

  f = 2 on 16x16 crops (an 8x8 code grid), 32 codes. The bundled photos are downscaled
  to a 64px short side so the val split has a few dozen crops, not thousands.
  """
  config = vqgan_default.get_config()
  m = config.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 32, (1, 2), 1, (8,)
  m.resolution, m.z_channels, m.embed_dim, m.n_embed = 16, 32, 32, 32
  config.data.image_size = 16
  config.data.photos.photo_short_side = 64
  config.data.photos.train_examples_per_epoch = 64
  config.loss.perceptual_weight = 0.0
  config.loss.disc_start = 10 ** 9
  config.batch_size = 4
  config.num_train_steps = 2
  config.log_every_steps = 2
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.num_eval_batches = 1
  config.eval_batch_size = 8
  config.async_checkpointing = False
  config.learning_rate = 1e-3
  return config


def build_stage1_workdir(workdir: str, config=None) -> str:
  """Trains the tiny config for its 2 steps in `workdir` (checkpoint at step 2)."""
  from vqgan_jax import stage1_trainer  # pylint: disable=g-import-not-at-top
  config = config if config is not None else tiny_stage1_config()
  stage1_trainer.train_and_evaluate(config, os.fspath(workdir))
  return os.fspath(workdir)
