"""The data block the scene configs share: the synthetic scene pairs of vqgan_jax.data.scenes.

  python -m vqgan_jax.data.scenes --output runs/scenes/data

writes 400 pairs of 64x48 scenes with 6 classes and an ignore label; every scene config
reads them as a "seg_folder" source (images/ + labels/, the ADE20K / COCO-Stuff layout).
Point `--config.data.seg_folder.folder_path` and `--config.data.label_maps.*` at a real
set (docs/data.md#segmentation-pairs) to train the same models on it.
"""

SCENE_CLASSES = 6          # vqgan_jax.data.scenes.CLASS_NAMES
IGNORE_LABEL = 255         # the horizon's unlabelled band
# One-hot channels of the conditioning VQGAN: the classes plus the "extra" unlabelled class.
SEGMENT_CHANNELS = SCENE_CLASSES + 1


def apply(config):
  """Points config.data at the scene folder (32x32 crops of scenes resized to 32x43)."""
  d = config.data
  d.name = "seg_folder"
  d.image_size = 32
  d.random_flip = True
  d.seg_folder.folder_path = "runs/scenes/data"
  d.seg_folder.val_fraction = 0.1
  d.label_maps.num_classes = SCENE_CLASSES
  d.label_maps.ignore_label = IGNORE_LABEL
  d.label_maps.ignore_as = "extra"
  return config
