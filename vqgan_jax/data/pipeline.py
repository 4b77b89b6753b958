"""Input pipelines for training and evaluation (grain, numpy batches): the dispatch over
the sources, chosen by `config.data.name`:
  "photos"      the colour photographs scikit-image ships (no download), each one class,
                with colour-cluster 'segmentation' maps (`photos`).
  "folder"      a directory of .jpg/.jpeg/.png files, optionally one sub-folder per class
                (`folders`).
  "seg_folder"  image / label-map pairs as ADE20K, COCO-Stuff and S-FLCKR-style sets ship
                them (`folders`; ids as `label_maps` says, docs/data.md#segmentation-pairs).
  "tfds"        a prepared TFDS dataset read through `tfds.data_source` (ArrayRecord), with
                `tfds.mask_key` also its segmentation masks (`tfds_data`).

Preprocessing follows the taming-transformers reference: resize the shorter
side to `image_size` (folder/tfds), random crop for training, centre crop for
evaluation, optional horizontal flip for training, and uint8 -> float32 via
x / 127.5 - 1 into [-1, 1] (the shared helpers are in `images`).

Public API (here unless a module is named; `vqgan_jax.data` re-exports all of it):
  default_data_config()                 the `config.data` fields with defaults (images)
  dataset_info(data_config)             classes, segment count, split sizes
  make_train_iterator(...)              infinite, shuffled, checkpointable
  make_train_dataset(...)               the grain IterDataset behind it
  make_eval_iterator(...)               one finite deterministic pass
  num_eval_batches(...)                 number of batches make_eval_iterator yields
  decode_image(path) / to_rgb_uint8(a)  image decoding used by the folder/tfds paths (images)
  photo_layout(data_config)             the prepared photos with their regions (photos)
  folder_skipped_files(data_config)     files the folder / seg_folder source skips (folders)
  check_data_config(data_config)        the data keys, errors naming the key
  has_segmentation(data_config)         whether batches carry 'segmentation'
  segment_classes(data_config)          ids in those maps (a conditioning VQGAN's
                                        in_channels = out_ch)
  condition_regions(data_config, ...)   larger map/image regions (sliding-window sampling)

Batches are dicts of numpy arrays: 'image' float32 (B, S, S, 3) in [-1, 1],
'label' int32 (B,), for sources with maps (photos, seg_folder, tfds with a
mask_key) also 'segmentation' int32 (B, S, S) of ids in [0, segment_classes),
and for eval batches 'mask' bool (B,) (False marks padding that keeps the last
batch full).
"""

from __future__ import annotations

import math
import os

import grain
import numpy as np

from vqgan_jax.data import common
from vqgan_jax.data.folders import (FolderEval, FolderTrain, SegFolderEval, SegFolderTrain,
                                    scan_folder, scan_seg_folder)
from vqgan_jax.data.images import PAD, center_crop, to_float
from vqgan_jax.data.label_maps import label_spec, load_seg_pair
from vqgan_jax.data.photos import PhotoEval, PhotoTrain, photo_args, photo_layout
from vqgan_jax.data.tfds_data import (TfdsEval, TfdsTrain, tfds_pair, tfds_source,
                                      tfds_transform_args)

SOURCE_NAMES = ("photos", "folder", "seg_folder", "tfds")
INPUTS = ("image", "segmentation")


def has_segmentation(data_config) -> bool:
  """Whether this source's batches carry 'segmentation' maps (no I/O)."""
  name = data_config.name
  if name in ("photos", "seg_folder"):
    return True
  return name == "tfds" and bool(data_config.tfds.get("mask_key", ""))


def segment_classes(data_config) -> int:
  """Ids in this source's 'segmentation' maps (0 without maps), from the config alone.

  It is the number of one-hot channels a conditioning VQGAN of these maps needs
  (model.in_channels = model.out_ch): photos.num_segments for the photos' colour
  clusters, else label_maps.num_classes, plus one for an "extra" ignore class.
  """
  if not has_segmentation(data_config):
    return 0
  if data_config.name == "photos":
    return int(data_config.photos.num_segments)
  return label_spec(data_config).num_ids


def check_data_config(data_config) -> None:
  """Checks the data keys without reading any data (ValueError naming the key).

  config_lib runs it before anything compiles; every pipeline entry runs it too.
  """
  dc = data_config
  if dc.name not in SOURCE_NAMES:
    raise ValueError(f"config.data.name={dc.name!r}: must be one of {SOURCE_NAMES}")
  if int(dc.image_size) <= 0:
    raise ValueError(f"config.data.image_size={dc.image_size}: must be positive")
  data_input = dc.get("input", "image")
  if data_input not in INPUTS:
    raise ValueError(f"config.data.input={data_input!r}: must be one of {INPUTS}")
  if dc.name == "seg_folder":
    sc = dc.seg_folder
    # An empty folder_path is an error when the source is first read (scan_seg_folder),
    # not here: dry runs and parameter counts check configs that name no data.
    if not 0.0 <= float(sc.val_fraction) <= 1.0:
      raise ValueError(f"config.data.seg_folder.val_fraction={sc.val_fraction}: must be in "
                       "[0, 1]")
    if not sc.image_dir or not sc.label_dir or sc.image_dir == sc.label_dir:
      raise ValueError(f"config.data.seg_folder.label_dir={sc.label_dir!r}: image_dir "
                       f"({sc.image_dir!r}) and label_dir must be two different sub-folders")
  if has_segmentation(dc) and dc.name != "photos":
    label_spec(dc)
  if data_input == "segmentation" and not has_segmentation(dc):
    raise ValueError(
        f"config.data.input='segmentation': data.name={dc.name!r} has no segmentation maps; "
        "use 'photos', 'seg_folder', or 'tfds' with data.tfds.mask_key")


def _train_records_and_transform(dc):
  """(records, RandomMap) for the training split of the configured source."""
  check_data_config(dc)
  size, flip = int(dc.image_size), bool(dc.random_flip)
  if dc.name == "photos":
    photos = photo_layout(dc)
    n = int(dc.photos.train_examples_per_epoch)
    if n <= 0:
      raise ValueError("photos.train_examples_per_epoch must be positive")
    # Record i is photo i % P: every photo is equally frequent in an epoch.
    return [i % len(photos) for i in range(n)], PhotoTrain(flip=flip, **photo_args(dc))
  if dc.name == "folder":
    scan = scan_folder(dc.folder)
    if not scan.train:
      raise ValueError(f"folder dataset: no training images in {dc.folder.folder_path} "
                       f"(val_fraction={dc.folder.val_fraction})")
    return list(scan.train), FolderTrain(size, flip)
  if dc.name == "seg_folder":
    spec = label_spec(dc)
    scan = scan_seg_folder(dc.seg_folder, spec)
    if not scan.train:
      raise ValueError(f"seg_folder dataset: no training pairs in {scan.root} "
                       f"(config.data.seg_folder.val_fraction={dc.seg_folder.val_fraction})")
    return list(scan.train), SegFolderTrain(spec, size, flip)
  tc = dc.tfds
  source = tfds_source(tc, tc.train_split)
  return list(range(len(source))), TfdsTrain(source, tc.image_key, tc.label_key, size, flip,
                                             **tfds_transform_args(dc, tc.train_split))


def _eval_records_and_transform(dc):
  """(records, Map accepting a record or PAD) for the val split."""
  check_data_config(dc)
  size = int(dc.image_size)
  if dc.name == "photos":
    records = [(i, y, x) for i, p in enumerate(photo_layout(dc))
               for (y, x, _, _) in p.val_windows]
    return records, PhotoEval(**photo_args(dc))
  if dc.name == "folder":
    return list(scan_folder(dc.folder).val), FolderEval(size)
  if dc.name == "seg_folder":
    spec = label_spec(dc)
    return list(scan_seg_folder(dc.seg_folder, spec).val), SegFolderEval(spec, size)
  tc = dc.tfds
  source = tfds_source(tc, tc.val_split)
  return list(range(len(source))), TfdsEval(source, tc.image_key, tc.label_key, size,
                                            **tfds_transform_args(dc, tc.val_split))


def dataset_info(data_config) -> dict:
  """Describes the configured source.

  Returns {'num_classes', 'class_names', 'num_segments' (ids in the
  'segmentation' maps, segment_classes; 0 without maps), 'num_train' (photos:
  the virtual epoch length), 'num_val' (examples in one eval pass over all
  processes, padding excluded), 'num_skipped' (unreadable folder files or bad
  seg_folder pairs; 0 otherwise)}. A seg_folder set has one class, named after
  its root folder.
  """
  dc = data_config
  check_data_config(dc)
  if dc.name == "photos":
    photos = photo_layout(dc)
    return {"num_classes": len(photos), "class_names": [p.name for p in photos],
            "num_segments": int(dc.photos.num_segments),
            "num_train": int(dc.photos.train_examples_per_epoch),
            "num_val": sum(len(p.val_windows) for p in photos), "num_skipped": 0}
  if dc.name == "folder":
    scan = scan_folder(dc.folder)
    return {"num_classes": len(scan.class_names), "class_names": list(scan.class_names),
            "num_segments": 0, "num_train": len(scan.train), "num_val": len(scan.val),
            "num_skipped": len(scan.skipped)}
  if dc.name == "seg_folder":
    scan = scan_seg_folder(dc.seg_folder, label_spec(dc))
    return {"num_classes": 1, "class_names": [os.path.basename(scan.root)],
            "num_segments": segment_classes(dc), "num_train": len(scan.train),
            "num_val": len(scan.val), "num_skipped": len(scan.skipped)}
  tc = dc.tfds
  train = tfds_source(tc, tc.train_split)
  val = tfds_source(tc, tc.val_split)
  class_names = []
  if tc.label_key:
    feature = train.dataset_info.features[tc.label_key]
    names = getattr(feature, "names", None)
    if names is None:
      raise ValueError(f"tfds: label feature {tc.label_key!r} is not a ClassLabel")
    class_names = list(names)
  else:
    class_names = [tc.tfds_name]
  return {"num_classes": len(class_names), "class_names": class_names,
          "num_segments": segment_classes(dc), "num_train": len(train), "num_val": len(val),
          "num_skipped": 0}


def condition_regions(data_config, size: int, count: int) -> tuple:
  """(segmentation (K, size, size) int32, image (K, size, size, 3) float32 in [-1, 1]) of
  up to `count` regions larger than a training crop, for sliding-window samples.

  photos: one per photo, a size x size square centred on the photo's val region and,
  where that region is smaller, extended into the rest of the photo (the val strips are
  narrower than a sliding-window canvas). seg_folder and tfds with a mask: the first val
  examples (train ones if the val split is empty), shorter side resized to `size` and
  centre-cropped, as the eval pipeline does at data.image_size.
  """
  check_data_config(data_config)
  if not has_segmentation(data_config):
    raise ValueError(f"config.data.name={data_config.name!r} has no segmentation maps")
  segs, images = [], []
  if data_config.name == "photos":
    for photo in photo_layout(data_config):
      h, w = photo.image.shape[:2]
      if min(h, w) < size:
        continue
      by, bx, bh, bw = photo.val_box
      y = int(np.clip(by + (bh - size) // 2, 0, h - size))
      x = int(np.clip(bx + (bw - size) // 2, 0, w - size))
      segs.append(np.asarray(photo.segmentation[y:y + size, x:x + size], np.int32))
      images.append(to_float(photo.image[y:y + size, x:x + size]))
      if len(segs) == count:
        break
    if not segs:
      raise ValueError(f"no photo is at least {size}x{size} pixels (data.photos."
                       f"photo_short_side={data_config.photos.photo_short_side}); lower "
                       "sliding_window_factor")
    return np.stack(segs), np.stack(images)
  spec = label_spec(data_config)
  if data_config.name == "seg_folder":
    scan = scan_seg_folder(data_config.seg_folder, spec)
    pairs = (scan.val or scan.train)[:count]
    loaded = [load_seg_pair(image_path, label_path, spec, size)
              for image_path, label_path in pairs]
  else:
    tc = data_config.tfds
    split = tc.val_split
    source = tfds_source(tc, split)
    if not len(source):
      split = tc.train_split
      source = tfds_source(tc, split)
    loaded = [tfds_pair(source[i], tc.image_key, tc.mask_key, spec, size,
                        f"tfds {tc.tfds_name} split {split} example {i}")
              for i in range(min(count, len(source)))]
  for image, ids in loaded:
    segs.append(np.ascontiguousarray(center_crop(ids, size), np.int32))
    images.append(to_float(center_crop(image, size)))
  return np.stack(segs), np.stack(images)


def _to_iter(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
  # Batches are formed in the MapDataset, so each worker computes whole batches
  # and the output is the same for any num_workers. A few reader threads and a
  # small prefetch buffer (counted in batches) are enough to stay ahead.
  threads = max(1, min(8, os.cpu_count() or 1))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                               prefetch_buffer_size=2 * threads))
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it_ds


def make_train_dataset(data_config, *, batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """The dataset behind make_train_iterator (iterating it again restarts it)."""
  common.check_process(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  records, transform = _train_records_and_transform(data_config)
  ds = grain.MapDataset.source(records)[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"process {process_index} of {process_count} has no training records "
                     f"({len(records)} in total)")
  # shuffle before repeat: grain reshuffles every epoch with seed + epoch.
  ds = ds.shuffle(seed=common.derive_seed(seed, "shuffle")).repeat()
  # random_map's generator is keyed by (seed, element index), which makes crops
  # resumable; the process index is folded in so hosts do not mirror each other.
  ds = ds.random_map(transform, seed=common.derive_seed(seed, "augment", process_index))
  ds = ds.batch(batch_size, drop_remainder=True)
  return _to_iter(ds, int(data_config.num_workers))


def make_train_iterator(data_config, *, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Infinite iterator of shuffled, augmented training batches for one process.

  `batch_size` is per process. Process p reads records p, p + P, p + 2P, ...
  of the split (P = process_count). The iterator supports get_state/set_state
  and grain.checkpoint.CheckpointSave/CheckpointRestore; equal seeds give equal
  batches, and a restored state continues with exactly the batches that followed.
  """
  return iter(make_train_dataset(data_config, batch_size=batch_size, seed=seed,
                                 process_index=process_index, process_count=process_count))


def _num_eval_batches(num_records: int, batch_size: int, process_count: int,
                      drop_remainder: bool) -> int:
  """Batches per process; the same on every process (multi-host steps must match)."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if drop_remainder:
    return (num_records // process_count) // batch_size
  return math.ceil(math.ceil(num_records / process_count) / batch_size)


def num_eval_batches(data_config, *, batch_size: int, process_count: int = 1,
                     drop_remainder: bool = False) -> int:
  """How many batches make_eval_iterator yields on every process."""
  num_val = dataset_info(data_config)["num_val"]
  return _num_eval_batches(num_val, batch_size, process_count, drop_remainder)


def make_eval_iterator(data_config, *, batch_size: int, process_index: int = 0,
                       process_count: int = 1, drop_remainder: bool = False) -> grain.IterDataset:
  """One deterministic pass over the validation split (centre crops / photo grid).

  Returns a re-iterable grain IterDataset of batches with 'mask'. Process p
  takes records p, p + P, ...; the last batch is padded to `batch_size` with
  mask=False examples (zeros, label 0) so shapes stay static. With
  drop_remainder=True, only full batches of real examples are kept (mask all
  True) and the same number on every process.
  """
  common.check_process(process_index, process_count)
  records, transform = _eval_records_and_transform(data_config)
  num_batches = _num_eval_batches(len(records), batch_size, process_count, drop_remainder)
  shard = records[process_index::process_count][:num_batches * batch_size]
  shard = shard + [PAD] * (num_batches * batch_size - len(shard))
  ds = grain.MapDataset.source(shard).map(transform).batch(batch_size)
  return _to_iter(ds, int(data_config.num_workers))
