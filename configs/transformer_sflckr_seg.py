"""Paper config: segmentation-conditioned S-FLCKR transformer (24 layers, width 1024).

Sequence = 256 codes of the segmentation VQGAN (16x16) + 256 image codes (block 512);
vocab = 1024 image codes + 1024 condition codes (separate ranges). The data are image /
label-map pairs ("seg_folder": DIR/images/*.jpg with DIR/labels/*.png of class ids; the
paper's S-FLCKR maps are DeepLab's 182 COCO-Stuff classes, unlabelled pixels 255): the
same data config trains both VQGANs (docs/data.md#segmentation-pairs).

  python train_stage1.py --config configs/vqgan_ffhq_f16_1024.py --workdir runs/sflckr/vqgan \
      --config.data.name=seg_folder --config.data.seg_folder.folder_path=DIR \
      --config.data.label_maps.num_classes=182
  python train_stage1.py --config configs/vqgan_ffhq_f16_1024.py --workdir runs/sflckr/vqgan_seg \
      --config.data.name=seg_folder --config.data.seg_folder.folder_path=DIR \
      --config.data.label_maps.num_classes=182 --config.data.input=segmentation \
      --config.model.in_channels=183 --config.model.out_ch=183 --config.loss.perceptual_weight=0
  python train_stage2.py --config configs/transformer_sflckr_seg.py --workdir runs/sflckr/gpt \
      --config.first_stage.workdir=runs/sflckr/vqgan \
      --config.cond.cond_stage_workdir=runs/sflckr/vqgan_seg \
      --config.data.seg_folder.folder_path=DIR
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
  config.data.name = "seg_folder"
  config.data.image_size = 256
  config.data.seg_folder.folder_path = ""   # required: DIR with images/ and labels/
  config.data.label_maps.num_classes = 182  # COCO-Stuff's classes (S-FLCKR's DeepLab maps)
  config.data.label_maps.ignore_label = 255
  config.data.label_maps.ignore_as = "extra"
  # Input: a folder source decodes ~210 256px images/s per core (docs/input_pipeline.md,
  # 2026-12-02) where the step needs ~300 (v5e-256) to ~1400 (v6e-256) per host: use grain
  # workers on a TPU host (8 here; `python -m vqgan_jax.bench --task data` measures yours).
  config.data.num_workers = 8
  config.batch_size = 16
  config.compute_dtype = "bfloat16"
  return config
