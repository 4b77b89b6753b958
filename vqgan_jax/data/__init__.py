"""Input pipelines: image sources and transforms, exported token files and the helpers both
share.

Modules (lowest first; each imports only those above it):
  common      seeds and process checks the image and token pipelines share
  images      `config.data` defaults, decoding, resizing, crop windows, example dicts
  label_maps  label-map ids (LabelSpec), decoding and resizing image / map pairs
  photos      the bundled scikit-image photos source ("photos")
  folders     the image-folder ("folder") and image / label-map pair ("seg_folder") sources
  tfds_data   the TFDS source ("tfds")
  pipeline    the dispatch over the sources: config checks, dataset_info, iterators
  tokens      exported token files (`vqgan_jax.data.tokens`)
  scenes      a synthetic segmentation set (`python -m vqgan_jax.data.scenes`)

`from vqgan_jax import data` gives the image pipeline's public API directly
(`data.make_train_iterator`, `data.make_eval_iterator`, ...); the token files are
`vqgan_jax.data.tokens`.
"""

from vqgan_jax.data.folders import (IMAGE_EXTENSIONS, FolderScan, SegFolderScan,
                                    folder_skipped_files, scan_folder, scan_seg_folder)
from vqgan_jax.data.images import (center_window, decode_image, default_data_config,
                                   grid_windows, random_window, resize_short_side, to_float,
                                   to_rgb_uint8)
from vqgan_jax.data.label_maps import LabelSpec, decode_label_map, label_spec, load_seg_pair
from vqgan_jax.data.photos import PHOTO_NAMES, Photo, photo_layout
from vqgan_jax.data.pipeline import (SOURCE_NAMES, check_data_config, condition_regions,
                                     dataset_info, has_segmentation, make_eval_iterator,
                                     make_train_dataset, make_train_iterator, num_eval_batches,
                                     segment_classes)
from vqgan_jax.data.tfds_data import tfds_label, tfds_pair, tfds_source
