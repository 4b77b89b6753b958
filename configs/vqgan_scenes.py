"""Image VQGAN of the synthetic scene pairs (the demo VQGAN's recipe on another source).

  python -m vqgan_jax.data.scenes --output runs/scenes/data
  python train_stage1.py --config configs/vqgan_scenes.py --workdir runs/scenes/vqgan
"""

from configs import scenes_data, vqgan_demo


def get_config():
  config = scenes_data.apply(vqgan_demo.get_config())
  config.num_train_steps = 400
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  return config
