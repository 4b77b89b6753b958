"""A tiny VQGAN for tests and smoke runs: compiles in seconds, trains in seconds.

  python train_stage1.py --config configs/vqgan_tiny.py --workdir /tmp/tiny
"""

from configs import vqgan_default


def get_config():
  config = vqgan_default.get_config()
  m = config.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 32, (1, 2), 1, (8,)
  m.resolution, m.z_channels, m.embed_dim, m.n_embed = 16, 32, 32, 32
  config.data.image_size = 16
  config.loss.perceptual_weight = 0.0
  config.loss.disc_start = 10 ** 6
  config.loss.disc_num_layers = 2
  config.loss.disc_ndf = 8
  config.batch_size = 4
  config.learning_rate = 1e-3
  config.num_train_steps = 3
  config.log_every_steps = 1
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.num_eval_batches = 1
  config.eval_batch_size = 8
  return config
