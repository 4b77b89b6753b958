"""Input pipelines: image sources and transforms (`images`), exported token files
(`tokens`) and the helpers both share (`common`).

`from vqgan_jax import data` gives the image pipeline's public API directly
(`data.make_train_iterator`, `data.make_eval_iterator`, ...); the token files are
`vqgan_jax.data.tokens`.
"""

from vqgan_jax.data.images import (IMAGE_EXTENSIONS, PHOTO_NAMES, SOURCE_NAMES,
                                   FolderScan, LabelSpec, Photo, SegFolderScan,
                                   center_window, check_data_config,
                                   condition_regions, dataset_info,
                                   decode_label_map, has_segmentation,
                                   label_spec, load_seg_pair, scan_seg_folder,
                                   segment_classes, tfds_pair,
                                   decode_image, default_data_config,
                                   folder_skipped_files, grid_windows,
                                   make_eval_iterator, make_train_dataset,
                                   make_train_iterator, num_eval_batches,
                                   photo_layout, random_window,
                                   resize_short_side, scan_folder, tfds_label,
                                   tfds_source, to_float, to_rgb_uint8)
