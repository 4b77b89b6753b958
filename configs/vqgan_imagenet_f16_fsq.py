"""VQGAN f16 on ImageNet with FSQ instead of VQ: levels (8, 8, 8, 5, 5, 5) = 64,000 codes.

Everything but the quantizer is configs/vqgan_imagenet_f16_16384.py (the reference's f16
model, data and schedule). FSQ (Mentzer et al. 2023) has no codebook to learn or collapse,
so it can use ~4x the reference's 16384 codes (log2 64000 = 15.97 bits a token); the
encoder's 256 latent channels go to 6 (one per level) through a Dense `in_proj` and back
through `out_proj`. No codebook loss (q_loss = 0), no dead codes to restart. Stage 2 takes
its vocabulary (64,000 codes) from the checkpoint's metadata.

  python train_stage1.py --config configs/vqgan_imagenet_f16_fsq.py --workdir gs://bucket/fsq64k \
      --config.data.tfds.tfds_data_dir=gs://bucket/tensorflow_datasets
"""

from configs import vqgan_imagenet_f16_16384


def get_config():
  config = vqgan_imagenet_f16_16384.get_config()
  m = config.model
  m.quantizer = "fsq"
  m.fsq_levels = (8, 8, 8, 5, 5, 5)  # the FSQ paper's 2**16-class levels: 64,000 codes
  m.n_embed = 8 * 8 * 8 * 5 * 5 * 5
  m.codebook_dim, m.l2_normalize = 0, False  # no codebook lookup
  return config
