"""VQGAN f16, 1024 codes, on your own folder of images (reference `custom_vqgan`).

  python train_stage1.py --config configs/vqgan_custom.py --workdir runs/custom \
      --config.data.folder.folder_path=/path/to/images [--config.data.folder.class_from_subfolder=True]
"""

from configs import vqgan_default


def get_config():
  config = vqgan_default.get_config()
  config.model.n_embed = 1024
  config.loss.disc_start = 10000
  config.loss.disc_weight = 0.8
  config.data.name = "folder"
  config.data.folder.folder_path = ""  # required: set on the command line
  config.data.folder.class_from_subfolder = False
  config.data.num_workers = 4
  config.batch_size = 8
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 2000
  return config
