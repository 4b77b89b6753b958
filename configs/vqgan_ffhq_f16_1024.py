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
  # Input at pod speed (docs/input_pipeline.md, 2026-12-02): a 1024px PNG decodes and
  # resizes at only ~22 images/s per core (`taskset -c 0 python -m vqgan_jax.bench --task
  # data --data_sources folder --generated_formats png --generated_size 1024x1024
  # --num_workers 0`); this step needs ~280 images/s per host on v5e-256 (1.39 TFLOP/image
  # at 50% MFU, 4 chips per host): 32 workers give ~700/s. For v6e-256 (~1320/s) train on
  # a copy downscaled to 256px (same pixels: the pipeline resizes to 256 anyway; ~210/s/core).
  config.data.num_workers = 32
  config.batch_size = 3 * 8
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 5000
  return config
