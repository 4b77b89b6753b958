"""VQGAN f16 with 16384 codes on ImageNet (reference `vqgan_imagenet_f16_16384`).

ImageNet must be prepared for TFDS (ArrayRecord) beforehand:
  python train_stage1.py --config configs/vqgan_imagenet_f16_16384.py --workdir gs://bucket/vq16k \
      --config.data.tfds.tfds_data_dir=gs://bucket/tensorflow_datasets
"""

from configs import vqgan_default


def get_config():
  config = vqgan_default.get_config()
  config.model.n_embed = 16384
  config.loss.disc_start = 250001
  config.loss.disc_weight = 0.8
  config.data.name = "tfds"
  config.data.tfds.tfds_name = "imagenet2012"
  config.data.tfds.train_split = "train"
  config.data.tfds.val_split = "validation"
  # Input at pod speed (docs/input_pipeline.md, 2026-12-02): one core turns ~150-175
  # ImageNet-sized JPEGs (500x375) into 256px crops per second (`taskset -c 0 python -m
  # vqgan_jax.bench --task data --generated_formats jpeg --num_workers 0`); this step needs
  # ~280 images/s per host on v5e-256 and ~1320 on v6e-256 (1.39 TFLOP/image at 50% MFU,
  # 4 chips per host), so 16 workers (~2400/s with a core each) leave ~1.8x headroom.
  config.data.num_workers = 16
  config.batch_size = 12 * 8  # the reference's 12 per GPU; lr scales with the global batch
  config.eval_every_steps = 5000
  config.num_eval_batches = 50
  config.checkpoint_every_steps = 5000
  return config
