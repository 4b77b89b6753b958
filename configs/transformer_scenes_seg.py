"""Segmentation-conditioned GPT on the synthetic scene pairs (the S-FLCKR setting, small).

  python -m vqgan_jax.data.scenes --output runs/scenes/data
  python train_stage1.py --config configs/vqgan_scenes.py --workdir runs/scenes/vqgan
  python train_stage1.py --config configs/vqgan_scenes_seg.py --workdir runs/scenes/vqgan_seg
  python train_stage2.py --config configs/transformer_scenes_seg.py --workdir runs/scenes/gpt
  python -m vqgan_jax.sample --workdir runs/scenes/gpt --output runs/scenes/samples

Condition: the 8x8 code grid of the map's crop (64 tokens), then the 64 image tokens.
"""

from configs import scenes_data, transformer_demo_seg


def get_config():
  config = scenes_data.apply(transformer_demo_seg.get_config())
  config.first_stage.workdir = "runs/scenes/vqgan"
  config.cond.cond_stage_workdir = "runs/scenes/vqgan_seg"
  config.num_train_steps = 400
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.sampling.num_samples = 8
  return config
