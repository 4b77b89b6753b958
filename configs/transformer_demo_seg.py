"""Demo segmentation-conditioned stage-2 GPT (the paper's S-FLCKR setting, in miniature).

The condition is the 8x8 code grid of the demo conditioning VQGAN (configs/vqgan_demo_seg.py)
prepended to the 8x8 image grid: 64 + 64 tokens.

  python train_stage1.py --config configs/vqgan_demo_seg.py --workdir runs/demo/vqgan_seg
  python train_stage2.py --config configs/transformer_demo_seg.py --workdir runs/demo/gpt_seg \
      --config.first_stage.workdir=runs/demo/vqgan \
      --config.cond.cond_stage_workdir=runs/demo/vqgan_seg
"""

from configs import transformer_demo


def get_config():
  config = transformer_demo.get_config()
  config.cond.kind = "spatial"
  config.cond.cfg_dropout = 0.0
  config.cond.cond_stage_workdir = "runs/demo/vqgan_seg"
  config.batch_size = 8                # sequences are twice as long as transformer_demo's
  return config
