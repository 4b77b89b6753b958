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
  m.scan_layers = True                  # one scanned block: compile time independent of depth
  config.cond.kind = "none"
  config.data.name = "folder"
  config.data.folder.class_from_subfolder = False
  config.data.image_size = 256
  # Input at pod speed (docs/input_pipeline.md, 2026-12-02): 1024px PNGs give ~22 images/s
  # per core (`taskset -c 0 python -m vqgan_jax.bench --task data --data_sources folder
  # --generated_formats png --generated_size 1024x1024 --num_workers 0`); this GPT
  # (~0.71 TFLOP/image with the encoder) needs ~555 images/s per host on v5e-256 and ~2600
  # on v6e-256 at 50% MFU. 32 workers give ~700/s (v5e); beyond that train from exported
  # tokens (config.tokens_dir) or a 256px copy of the images (~210/s per core).
  config.data.num_workers = 32
  config.batch_size = 16
  config.compute_dtype = "bfloat16"
  return config
