"""Conditioning VQGAN of the scene pairs' label maps (spatial conditioning, stage 1).

Encodes one-hot maps of 6 classes + the unlabelled class (7 channels), f = 4 like the
image VQGAN, so a 32x32 crop gives an 8x8 condition grid aligned with the image grid.

  python train_stage1.py --config configs/vqgan_scenes_seg.py --workdir runs/scenes/vqgan_seg
"""

from configs import scenes_data, vqgan_demo_seg


def get_config():
  config = scenes_data.apply(vqgan_demo_seg.get_config())
  m = config.model
  m.in_channels = m.out_ch = scenes_data.SEGMENT_CHANNELS
  config.num_train_steps = 300
  return config
