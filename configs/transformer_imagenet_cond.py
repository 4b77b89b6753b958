"""Paper config: class-conditional ImageNet 256x256 (48 layers, width 1536, ~1.4B params).

Tokens: the f16 VQGAN with 16384 codes (16x16 grid); sequence = class token + 256 codes
(257). The 1000 class ids sit above the image codes (vocab 17384; see stage2_trainer).

  python train_stage2.py --config configs/transformer_imagenet_cond.py \
      --workdir runs/imagenet/gpt --config.first_stage.workdir=runs/imagenet/vqgan16384
"""

from configs import transformer_default


def get_config():
  config = transformer_default.get_config()
  config.first_stage.workdir = ""       # required: the ImageNet f16/16384 VQGAN
  config.first_stage.n_embed = 16384
  config.first_stage.latent_grid = (16, 16)
  m = config.model
  m.n_layer = 48
  m.n_head = 16
  m.n_embd = 1536
  m.remat = "full"                      # activations of 48 blocks do not fit otherwise
  m.scan_layers = True                  # one scanned block: compile time independent of depth
  config.cond.kind = "class"
  config.cond.num_classes = 1000
  config.cond.cfg_dropout = 0.0         # the paper has no guidance; > 0 adds a null class
  config.data.name = "tfds"
  config.data.tfds.tfds_name = "imagenet2012"
  config.data.image_size = 256
  # Input at pod speed (docs/input_pipeline.md, 2026-12-02): ~150-175 ImageNet JPEGs -> 256px
  # crops per second per core (`taskset -c 0 python -m vqgan_jax.bench --task data
  # --generated_formats jpeg --num_workers 0`); this step (GPT with remat + VQGAN encoder,
  # ~3.1 TFLOP/image) needs ~130 images/s per host on v5e-256 and ~600 on v6e-256 at 50%
  # MFU: 8 workers (~1200/s) leave ~2x headroom.
  config.data.num_workers = 8
  config.batch_size = 64
  config.compute_dtype = "bfloat16"
  config.mesh.fsdp = -1                 # shard the 1.4B params and AdamW state
  config.mesh.data = 1
  return config
