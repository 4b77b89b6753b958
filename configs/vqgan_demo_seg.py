"""Demo conditioning VQGAN: encodes the photos' segmentation maps (for spatial stage 2).

Trained on one-hot segmentation maps (data.input="segmentation", one channel per segment,
scaled to [-1, 1]) with the pixel loss only: no LPIPS (an RGB network) and no GAN, as the
reference's conditioning stages. Same f = 4 as configs/vqgan_demo.py, so a 32x32 crop gives
an 8x8 condition grid aligned with the image grid.

  python train_stage1.py --config configs/vqgan_demo_seg.py --workdir runs/demo/vqgan_seg
"""

from configs import vqgan_demo


def get_config():
  config = vqgan_demo.get_config()
  config.data.input = "segmentation"
  segments = config.data.photos.num_segments   # 8
  m = config.model
  m.in_channels = segments
  m.out_ch = segments
  m.n_embed = 64              # segmentation maps are simple: a small codebook suffices
  m.ch_mult = (1, 1, 1)       # still f = 4, narrower than the image VQGAN
  m.z_channels = 32
  m.embed_dim = 32
  m.attn_resolutions = ()
  config.data.random_flip = True
  config.loss.perceptual_weight = 0.0
  # L2, not L1: for a one-hot channel that is on with probability ~1/8 the L1-optimal output
  # is -1 everywhere (the median), which codes nothing; L2's optimum is the mean, whose
  # argmax recovers the segment (the reference uses a BCE loss here).
  config.loss.pixel_loss = "l2"
  config.loss.disc_start = 10 ** 9            # never: no discriminator, no GAN term
  config.num_train_steps = 400
  config.log_every_steps = 100
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  return config
