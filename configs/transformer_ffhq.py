"""Paper config: unconditional FFHQ 256x256 transformer (28 layers, width 1024, ~355M params).

Tokens: an f16 VQGAN with 1024 codes (16x16 grid); sequence = start token + 256 codes.
Set the stage-1 workdir and the image folder:

  python train_stage2.py --config configs/transformer_ffhq.py --workdir runs/ffhq/gpt \
      --config.first_stage.workdir=runs/ffhq/vqgan --config.data.folder.folder_path=/data/ffhq
"""

from configs import transformer_default


def get_config():
  config = transformer_default.get_config()
  config.first_stage.workdir = ""       # required: the FFHQ VQGAN
  config.first_stage.n_embed = 1024     # checked against the checkpoint
  config.first_stage.latent_grid = (16, 16)
  m = config.model
  m.n_layer = 28
  m.n_head = 16
  m.n_embd = 1024
  config.cond.kind = "none"
  config.data.name = "folder"
  config.data.folder.class_from_subfolder = False
  config.data.image_size = 256
  config.batch_size = 16
  config.compute_dtype = "bfloat16"
  return config
