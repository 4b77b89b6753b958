"""Demo VQGAN on the bundled scikit-image photos; trains in minutes on a 2-core CPU.

  python train_stage1.py --config configs/vqgan_demo.py --workdir runs/demo/vqgan
"""

from configs import vqgan_default


def get_config():
  config = vqgan_default.get_config()
  m = config.model
  m.ch = 32
  m.ch_mult = (1, 2, 2)       # f = 4: a 32x32 crop becomes an 8x8 grid of codes
  m.num_res_blocks = 1
  m.attn_resolutions = (8,)
  m.resolution = 32
  m.z_channels = 64
  m.embed_dim = 64
  m.n_embed = 128
  m.codebook_dim = 8          # low-dimensional, l2-normalised lookup keeps codes in use
  m.l2_normalize = True
  # 8 groups, not the reference's 32: with ch=32, 32 groups make every GroupNorm an
  # InstanceNorm, and the decoder's last norm then cannot pass a crop's colour on to
  # conv_out (orange-brown reconstructions with a magenta/green border fringe).
  m.norm_groups = 8
  m.restart_dead_codes = True  # keeps >= 50% of the 128 codes in use
  config.data.name = "photos"
  config.data.image_size = 32
  config.data.photos.photo_short_side = 128  # a 32x32 crop shows a quarter of a photo's height
  config.data.random_flip = True
  # No GAN in the demo: 200 steps of a fresh discriminator after step 400 cost 2.4 dB val
  # PSNR and shift colours (21.1 -> 18.8 dB); the 600 steps all go to L1 + LPIPS.
  # LPIPS on both images reflect-padded by 8 pixels: on 32x32 crops VGG16's deep layers see
  # mostly zero padding; padded, val PSNR 21.66 -> 22.56 dB and the coffee and rocket crops
  # keep their colours (docs/results.md#ablations-of-the-demo-recipe).
  config.loss.perceptual_pad = 8
  config.loss.disc_start = 10 ** 9
  config.loss.disc_ndf = 32
  config.loss.disc_norm = "batch"
  config.batch_size = 8
  config.learning_rate = 4e-4
  config.num_train_steps = 600
  config.log_every_steps = 50
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.num_eval_batches = 0
  config.eval_batch_size = 32
  return config
