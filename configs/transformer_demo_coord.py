"""Demo of high-resolution training: 8x8 token crops of 16x16 grids, coordinate-conditioned.

64x64 photo crops are encoded by the demo VQGAN (f = 4) into 16x16 grids; the GPT sees a
random 8x8 window of each plus two tokens binning the window's origin (row, column), and
samples whole 16x16 grids with the sliding attention window (paper fig. 3).

  python train_stage2.py --config configs/transformer_demo_coord.py \
      --workdir runs/demo/gpt_coord --config.first_stage.workdir=runs/demo/vqgan
"""

from configs import transformer_demo


def get_config():
  config = transformer_demo.get_config()
  config.cond.kind = "coord"
  config.cond.cfg_dropout = 0.0
  config.crop_tokens = 8
  config.cond.coord_grid = 9           # one bin per origin 0..8 of an 8x8 window in 16x16
  config.data.image_size = 64
  config.batch_size = 8                # 4x the pixels per example of the other demos
  config.eval_batch_size = 16
  config.sampling.sliding_window_factor = 2   # 16x16 tokens = the full 64x64 crop
  return config
