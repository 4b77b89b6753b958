"""Paper config: segmentation-conditioned S-FLCKR transformer (24 layers, width 1024).

Sequence = 256 codes of the segmentation VQGAN (16x16) + 256 image codes (block 512);
vocab = 1024 image codes + 1024 condition codes (separate ranges). Conditioning needs
segmentation maps, which only the 'photos' source provides so far: for real S-FLCKR data,
a source with per-image segmentation maps must be added to vqgan_jax/data.py.

  python train_stage2.py --config configs/transformer_sflckr_seg.py --workdir runs/sflckr/gpt \
      --config.first_stage.workdir=runs/sflckr/vqgan \
      --config.cond.cond_stage_workdir=runs/sflckr/vqgan_seg
"""

from configs import transformer_default


def get_config():
  config = transformer_default.get_config()
  config.first_stage.workdir = ""       # required: the f16/1024 image VQGAN
  config.first_stage.n_embed = 1024
  config.first_stage.latent_grid = (16, 16)
  m = config.model
  m.n_layer = 24
  m.n_head = 16
  m.n_embd = 1024
  m.scan_layers = True                  # one scanned block: compile time independent of depth
  m.block_size = 512
  config.cond.kind = "spatial"
  config.cond.cond_stage_workdir = ""   # required: the f16/1024 segmentation VQGAN
  config.cond.n_embed = 1024
  config.cond.latent_grid = (16, 16)
  config.data.name = "photos"
  config.data.image_size = 256
  config.data.photos.photo_short_side = 512
  # Input (docs/input_pipeline.md, 2026-12-02): photos are in-memory crops, ~2400 images/s
  # at 256px in the main process (2 cores) but ~540-930 with 1-2 grain workers, which each
  # prepare the photos again and ship float32 batches back (`python -m vqgan_jax.bench
  # --task data --data_sources photos --num_workers 0,1,2`); the step needs ~300 (v5e-256)
  # to ~1400 (v6e-256) images/s per host, so no workers.
  config.data.num_workers = 0
  config.batch_size = 16
  config.compute_dtype = "bfloat16"
  return config
