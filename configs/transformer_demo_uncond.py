"""Demo unconditional stage-2 GPT (a start token only): the baseline of transformer_demo.py.

  python train_stage2.py --config configs/transformer_demo_uncond.py \
      --workdir runs/demo/gpt_uncond --config.first_stage.workdir=runs/demo/vqgan
"""

from configs import transformer_demo


def get_config():
  config = transformer_demo.get_config()
  config.cond.kind = "none"
  config.cond.cfg_dropout = 0.0
  return config
