"""VQGAN f16 with 1024 codes on FFHQ (reference `ffhq_vqgan` settings).

FFHQ as a folder of PNGs (e.g. images1024x1024/), or a TFDS build of it:
  python train_stage1.py --config configs/vqgan_ffhq_f16_1024.py --workdir runs/ffhq_vq \
      --config.data.folder.folder_path=/data/ffhq/images1024x1024
"""

from configs import vqgan_default


def get_config():
  config = vqgan_default.get_config()
  config.model.n_embed = 1024
  config.loss.disc_start = 30001
  config.loss.disc_weight = 0.8
  config.data.name = "folder"
  config.data.folder.class_from_subfolder = False
  config.data.folder.val_fraction = 0.02
  config.data.num_workers = 8
  config.batch_size = 3 * 8
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 5000
  return config
