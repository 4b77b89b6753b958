"""Input pipelines for training and evaluation (grain, numpy batches).

Three sources, chosen by `config.data.name`:
  "photos"  the colour photographs scikit-image ships (no download). Each photo
            is one class; training draws random crops from one region of each
            photo and evaluation uses a fixed grid of crops from a disjoint
            region. Every crop also carries a 'segmentation' map (a colour
            clustering of the photo) for spatially conditioned stage-2 models.
            Photos are downscaled to `photo_short_side`; the val region is the
            far end of the longer side (see _split_boxes, _segment_photos).
  "folder"  a directory of .jpg/.jpeg/.png files (optionally one sub-folder per
            class), split deterministically into train and validation files.
            Every file is decoded once up front (threaded, cached per process)
            so unreadable files are found before training; for very large
            collections prefer "tfds".
  "tfds"    a prepared TFDS dataset read through `tfds.data_source` (ArrayRecord).

Preprocessing follows the taming-transformers reference: resize the shorter
side to `image_size` (folder/tfds), random crop for training, centre crop for
evaluation, optional horizontal flip for training, and uint8 -> float32 via
x / 127.5 - 1 into [-1, 1].

Public API:
  default_data_config()                 the `config.data` fields with defaults
  dataset_info(data_config)             classes, segment count, split sizes
  make_train_iterator(...)              infinite, shuffled, checkpointable
  make_train_dataset(...)               the grain IterDataset behind it
  make_eval_iterator(...)               one finite deterministic pass
  num_eval_batches(...)                 number of batches make_eval_iterator yields
  decode_image(path) / to_rgb_uint8(a)  image decoding used by the folder/tfds paths
  photo_layout(data_config)             the prepared photos with their regions
  folder_skipped_files(data_config)     unreadable files the folder source skips

Batches are dicts of numpy arrays: 'image' float32 (B, S, S, 3) in [-1, 1],
'label' int32 (B,), for photos also 'segmentation' int32 (B, S, S), and for eval
batches 'mask' bool (B,) (False marks padding that keeps the last batch full).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import math
import os
from typing import Any, NamedTuple

import grain
import ml_collections
import numpy as np
from PIL import Image, ImageOps

from vqgan_jax.data import common

# The photographs scikit-image ships in its package data (all load offline with
# scikit-image 0.26). Order fixes the class index.
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
               "immunohistochemistry", "retina")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# k-means settings for the photos' segmentation maps. Fixed so that the maps
# are identical in every process and on every run.
_KMEANS_SEED = 0
_KMEANS_ITERS = 25
_KMEANS_MAX_SAMPLES = 32768


# Eval records that only fill up the last batch. Not None: grain treats None
# elements as filtered out and would drop them from the batch.
_PAD = "<padding>"


def _is_pad(element) -> bool:
  return isinstance(element, str) and element == _PAD


def default_data_config() -> ml_collections.ConfigDict:
  """Returns `config.data` with every field the pipeline reads."""
  c = ml_collections.ConfigDict()
  # Which source: "photos" (bundled scikit-image photos), "folder" or "tfds".
  c.name = "photos"
  # Side of the square crops fed to the model.
  c.image_size = 32
  # Random horizontal flips for training (never applied to evaluation).
  c.random_flip = True
  # 0: load in the main process (threads); >0: that many grain worker processes.
  c.num_workers = 0
  # What a stage-1 model encodes: "image" (RGB) or "segmentation" (one-hot condition
  # maps, for a conditioning VQGAN with in_channels = out_ch = photos.num_segments).
  c.input = "image"

  c.photos = ml_collections.ConfigDict()
  # Each source photo is first downscaled so that its shorter side is this.
  c.photos.photo_short_side = 128
  # Fraction of each photo's longer side held out as the validation region.
  c.photos.val_fraction = 0.25
  # Number of colour clusters in the 'segmentation' maps.
  c.photos.num_segments = 8
  # Length of one (virtual) training epoch in examples: the unit of reshuffling.
  c.photos.train_examples_per_epoch = 1024

  c.folder = ml_collections.ConfigDict()
  # Root directory, scanned recursively for .jpg/.jpeg/.png (any case).
  c.folder.folder_path = ""
  # True: class = first-level sub-folder name; False: every image has label 0.
  c.folder.class_from_subfolder = True
  # True: an unreadable image is an error; False: skipped with a warning.
  c.folder.strict = False
  # Fraction of files for validation, chosen by ranking files on a path hash.
  c.folder.val_fraction = 0.05

  c.tfds = ml_collections.ConfigDict()
  # TFDS dataset name, e.g. "imagenet2012" (must already be prepared).
  c.tfds.tfds_name = ""
  # TFDS data_dir; empty string = the TFDS default.
  c.tfds.tfds_data_dir = ""
  # Split names (TFDS slicing syntax such as "train[:90%]" is allowed).
  c.tfds.train_split = "train"
  c.tfds.val_split = "validation"
  # Feature keys of the image and the class label; empty label_key = no labels.
  c.tfds.image_key = "image"
  c.tfds.label_key = "label"
  return c


# ----------------------------------------------------------------------------
# Image decoding and preprocessing.


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
  """Converts an image array (H, W), (H, W, 1|2|3|4) to uint8 RGB (H, W, 3).

  Integer images wider than 8 bits (uint16, or int32/uint32 as PIL returns for
  16-bit PNGs) are taken as 16-bit and scaled to 8 bits (x / 257, rounded). Grayscale is repeated to three
  channels. An alpha channel is composited onto a white background, so that
  transparent areas look as they do in a viewer instead of showing whatever
  colour the invisible pixels happen to hold.
  """
  a = np.asarray(array)
  if a.dtype == np.uint16 or a.dtype == np.int32 or a.dtype == np.uint32:
    a = np.clip(np.round(a.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
  elif a.dtype == np.bool_:
    a = a.astype(np.uint8) * 255
  elif a.dtype != np.uint8:
    raise ValueError(f"unsupported image dtype {a.dtype}")
  if a.ndim == 2:
    a = a[:, :, None]
  if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(f"unsupported image shape {a.shape}")
  channels = a.shape[-1]
  if channels in (2, 4):
    color = a[..., :-1].astype(np.float32)
    alpha = a[..., -1:].astype(np.float32) / 255.0
    a = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
  if a.shape[-1] == 1:
    a = np.repeat(a, 3, axis=-1)
  return np.ascontiguousarray(a)


def _pil_to_rgb_uint8(img: Image.Image) -> np.ndarray:
  """Converts a decoded PIL image of any mode to uint8 RGB (see to_rgb_uint8)."""
  if img.mode.startswith("I"):
    # 16-bit PNGs decode as "I;16"/"I" (integers up to 65535).
    return to_rgb_uint8(np.clip(np.asarray(img), 0, None).astype(np.uint32))
  if img.mode == "F":
    raise ValueError("floating-point images are not supported")
  has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
      img.mode == "P" and "transparency" in img.info)
  if has_alpha:
    return to_rgb_uint8(np.asarray(img.convert("RGBA")))
  if img.mode not in ("RGB", "L"):
    img = img.convert("RGB")
  return to_rgb_uint8(np.asarray(img))


def decode_image(path: str, min_short_side: int | None = None) -> np.ndarray:
  """Decodes an image file with PIL into uint8 RGB (H, W, 3).

  EXIF orientation is applied. With `min_short_side`, JPEG decoding may use
  DCT scaling (PIL draft mode) as long as the shorter side stays at least that
  large; this is several times faster for big photos that get downscaled anyway.
  """
  with Image.open(path) as img:
    if min_short_side is not None and img.format == "JPEG":
      w, h = img.size
      scale = min_short_side / min(w, h)
      if scale < 1:
        img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
    img = ImageOps.exif_transpose(img)
    img.load()
    return _pil_to_rgb_uint8(img)


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes (bicubic, antialiased by PIL) so that the shorter side is `size`."""
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  if h <= w:
    new_h, new_w = size, max(size, round(w * size / h))
  else:
    new_h, new_w = max(size, round(h * size / w)), size
  resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
  return np.asarray(resized)


def random_window(h: int, w: int, size: int, rng: np.random.Generator):
  y = int(rng.integers(0, h - size + 1))
  x = int(rng.integers(0, w - size + 1))
  return y, x


def center_window(h: int, w: int, size: int):
  # Same offsets as albumentations.CenterCrop, which the reference uses.
  return (h - size) // 2, (w - size) // 2


def to_float(image_uint8: np.ndarray) -> np.ndarray:
  return image_uint8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _example(image: np.ndarray, label: int, segmentation=None, mask=None):
  ex = {"image": to_float(image), "label": np.int32(label)}
  if segmentation is not None:
    ex["segmentation"] = segmentation.astype(np.int32)
  if mask is not None:
    ex["mask"] = np.bool_(mask)
  return ex


# ----------------------------------------------------------------------------
# Bundled photos.


class Photo(NamedTuple):
  """One prepared photo. Boxes and windows are (y, x, height, width)."""
  name: str
  image: np.ndarray          # uint8 (H, W, 3), shorter side = photo_short_side
  segmentation: np.ndarray   # uint8 (H, W), cluster index per pixel
  train_box: tuple           # region random training crops are drawn from
  val_box: tuple             # disjoint region the evaluation grid covers
  val_windows: tuple         # evaluation crops, non-overlapping, inside val_box


@functools.lru_cache(maxsize=None)
def _load_source_photos(short_side: int):
  """Loads and downscales the scikit-image photos; cached per process."""
  import skimage.data  # Lazy: only the photos source needs scikit-image.
  photos, failed = [], []
  for name in PHOTO_NAMES:
    try:
      original = to_rgb_uint8(getattr(skimage.data, name)())
    except Exception as e:  # pylint: disable=broad-except
      # Some photos may be fetched on demand in other scikit-image versions.
      failed.append(name)
      logging.warning("photos: could not load skimage.data.%s (%s); skipped", name, e)
      continue
    image = np.array(resize_short_side(original, short_side))
    image.setflags(write=False)
    photos.append((name, image))
  if not photos:
    raise RuntimeError(f"photos: none of {PHOTO_NAMES} could be loaded from scikit-image")
  return tuple(photos), tuple(failed)


def _kmeans_colors(pixels: np.ndarray, k: int) -> np.ndarray:
  """Deterministic k-means (k-means++ init, fixed iterations) on RGB pixels.

  Returns the (k, 3) centroids sorted by luminance, so label 0 is the darkest.
  """
  rng = np.random.default_rng(_KMEANS_SEED)
  x = pixels.astype(np.float64)
  if len(x) > _KMEANS_MAX_SAMPLES:
    x = x[rng.choice(len(x), _KMEANS_MAX_SAMPLES, replace=False)]
  centers = [x[rng.integers(len(x))]]
  d2 = np.sum((x - centers[0]) ** 2, axis=1)
  for _ in range(1, k):
    total = d2.sum()
    # All remaining points coincide with a centre: any choice is as good.
    idx = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
    centers.append(x[idx])
    d2 = np.minimum(d2, np.sum((x - x[idx]) ** 2, axis=1))
  centers = np.stack(centers)
  for _ in range(_KMEANS_ITERS):
    assign = _nearest(x, centers)
    for j in range(k):
      members = x[assign == j]
      if len(members):  # An empty cluster keeps its previous centre.
        centers[j] = members.mean(axis=0)
  luminance = centers @ np.array([0.299, 0.587, 0.114])
  return centers[np.argsort(luminance, kind="stable")]


def _nearest(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
  d = (np.sum(x * x, axis=1, keepdims=True) - 2.0 * x @ centers.T
       + np.sum(centers * centers, axis=1)[None, :])
  return np.argmin(d, axis=1)


def _split_boxes(h: int, w: int, val_fraction: float, size: int, name: str):
  """Splits a photo into a train box and a disjoint val box along its longer side.

  The val region is the last max(round(val_fraction * L), size) pixels of the
  longer side L (rightmost columns for landscape/square, bottom rows for
  portrait); the train region is the rest. Both must fit a size x size crop.
  """
  long_side = max(h, w)
  val_len = max(int(round(val_fraction * long_side)), size)
  train_len = long_side - val_len
  if min(h, w) < size or train_len < size:
    # Enough for every photo (the square ones are the tightest case).
    needed = max(2 * size, math.ceil(size / max(1e-6, 1.0 - val_fraction)) + 1)
    raise ValueError(
        f"photos: {name} is {h}x{w} after downscaling, too small for a "
        f"{size}px train region and a {val_len}px val region; set "
        f"photos.photo_short_side >= {needed} or decrease image_size/val_fraction")
  if w >= h:
    return (0, 0, h, train_len), (0, train_len, h, val_len)
  return (0, 0, train_len, w), (train_len, 0, val_len, w)


def grid_windows(box, size: int):
  """Non-overlapping size x size windows tiling `box`, centred (row-major)."""
  by, bx, bh, bw = box
  rows, cols = bh // size, bw // size
  y0 = by + (bh - rows * size) // 2
  x0 = bx + (bw - cols * size) // 2
  return tuple((y0 + r * size, x0 + c * size, size, size)
               for r in range(rows) for c in range(cols))


@functools.lru_cache(maxsize=None)
def _segment_photos(short_side: int, num_segments: int) -> tuple:
  """Per-photo segmentation maps (uint8 (H, W)); cached per process.

  Method: k-means with `num_segments` centres in RGB, fitted on a fixed random
  sample (seed 0, at most 32768) of the pixels of all downscaled photos, with
  k-means++ initialisation and 25 Lloyd iterations in float64 numpy; every
  pixel is labelled with its nearest centre, centres ordered by luminance
  (0 = darkest). Independent of image_size, so stage 1 and 2 agree.
  """
  if not 1 <= num_segments <= 255:
    raise ValueError(f"photos.num_segments must be in [1, 255], got {num_segments}")
  photos, _ = _load_source_photos(short_side)
  pixels = np.concatenate([img.reshape(-1, 3) for _, img in photos])
  centers = _kmeans_colors(pixels, num_segments)
  maps = []
  for _, image in photos:
    seg = _nearest(image.reshape(-1, 3).astype(np.float64), centers)
    seg = seg.reshape(image.shape[:2]).astype(np.uint8)
    seg.setflags(write=False)
    maps.append(seg)
  return tuple(maps)


@functools.lru_cache(maxsize=None)
def _prepare_photos(short_side: int, val_fraction: float, num_segments: int,
                    image_size: int) -> tuple:
  """The photos with segmentation maps and train/val regions; cached per process."""
  photos, _ = _load_source_photos(short_side)
  segmentations = _segment_photos(short_side, num_segments)
  prepared = []
  for (name, image), seg in zip(photos, segmentations):
    h, w = image.shape[:2]
    train_box, val_box = _split_boxes(h, w, val_fraction, image_size, name)
    prepared.append(Photo(name, image, seg, train_box, val_box,
                          grid_windows(val_box, image_size)))
  return tuple(prepared)


def _photos_from_config(dc) -> tuple:
  p = dc.photos
  return _prepare_photos(int(p.photo_short_side), float(p.val_fraction),
                         int(p.num_segments), int(dc.image_size))


def photo_layout(data_config) -> tuple:
  """The prepared photos (tuple of `Photo`) for this config, e.g. for tests and plots."""
  return _photos_from_config(data_config)


@dataclasses.dataclass(frozen=True)
class _PhotoTrain(grain.transforms.RandomMap):
  """Record = photo index -> random crop (and flip) inside its train box."""
  short_side: int
  val_fraction: float
  num_segments: int
  size: int
  flip: bool

  def random_map(self, element, rng: np.random.Generator):
    photo = _prepare_photos(self.short_side, self.val_fraction, self.num_segments,
                            self.size)[element]
    by, bx, bh, bw = photo.train_box
    dy, dx = random_window(bh, bw, self.size, rng)
    y, x = by + dy, bx + dx
    image = photo.image[y:y + self.size, x:x + self.size]
    seg = photo.segmentation[y:y + self.size, x:x + self.size]
    if self.flip and rng.random() < 0.5:
      image, seg = image[:, ::-1], seg[:, ::-1]
    return _example(image, element, seg)


@dataclasses.dataclass(frozen=True)
class _PhotoEval(grain.transforms.Map):
  """Record = (photo index, y, x) or _PAD -> fixed crop."""
  short_side: int
  val_fraction: float
  num_segments: int
  size: int

  def map(self, element):
    s = self.size
    if _is_pad(element):
      return _example(np.zeros((s, s, 3), np.uint8), 0, np.zeros((s, s), np.int32), False)
    i, y, x = element
    photo = _prepare_photos(self.short_side, self.val_fraction, self.num_segments,
                            self.size)[i]
    return _example(photo.image[y:y + s, x:x + s], i,
                    photo.segmentation[y:y + s, x:x + s], True)


def _photo_args(dc):
  p = dc.photos
  return dict(short_side=int(p.photo_short_side), val_fraction=float(p.val_fraction),
              num_segments=int(p.num_segments), size=int(dc.image_size))


# ----------------------------------------------------------------------------
# Image folder.


class FolderScan(NamedTuple):
  class_names: tuple
  train: tuple      # ((path, label), ...) sorted by relative path
  val: tuple
  skipped: tuple    # unreadable paths


# (path, size, mtime_ns) -> None if the file decodes, else the error text, so
# that repeated scans (dataset_info, train, eval) decode each file only once.
_readable_cache: dict = {}
_warned_skips: set = set()


def _check_readable(path: str) -> str | None:
  try:
    st = os.stat(path)
  except OSError as e:  # e.g. a dangling symlink
    return f"{type(e).__name__}: {e}"
  key = (path, st.st_size, st.st_mtime_ns)
  if key not in _readable_cache:
    try:
      with Image.open(path) as img:
        # draft() still reads the whole file (so truncation is caught) but
        # skips most of the JPEG inverse DCT work.
        if img.format == "JPEG":
          img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
        img.load()
      _readable_cache[key] = None
    except Exception as e:  # pylint: disable=broad-except
      _readable_cache[key] = f"{type(e).__name__}: {e}"
  return _readable_cache[key]


def _path_rank_key(rel_path: str) -> bytes:
  return hashlib.sha256(rel_path.encode("utf-8")).digest()


def scan_folder(fc) -> FolderScan:
  """Lists, checks and splits an image folder (readability results are cached)."""
  root = os.path.abspath(os.path.expanduser(str(fc.folder_path)))
  if not fc.folder_path or not os.path.isdir(root):
    raise ValueError(f"folder dataset: {fc.folder_path!r} is not a directory")
  files = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    for f in filenames:
      if f.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.relpath(os.path.join(dirpath, f), root))
  files.sort()
  if fc.class_from_subfolder:
    at_root = [f for f in files if os.sep not in f]
    if at_root:
      logging.warning("folder dataset: ignoring %d image(s) directly in %s (no class "
                      "sub-folder), e.g. %s", len(at_root), root, at_root[:3])
    files = [f for f in files if os.sep in f]
  if not files:
    raise ValueError(f"folder dataset: no .jpg/.jpeg/.png images found in {root}")
  # Classes come from all image files found, so a corrupt file never shifts labels.
  if fc.class_from_subfolder:
    class_names = tuple(sorted({f.split(os.sep, 1)[0] for f in files}))
  else:
    class_names = (os.path.basename(root),)
  class_index = {n: i for i, n in enumerate(class_names)}

  paths = [os.path.join(root, rel) for rel in files]
  # Decoding is mostly outside the GIL, so threads speed up the one-time check.
  with concurrent.futures.ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
    errors = list(pool.map(_check_readable, paths))
  good, skipped = [], []
  for rel, path, err in zip(files, paths, errors):
    if err is not None:
      if fc.strict:
        raise ValueError(f"folder dataset: cannot read image {path}: {err}")
      skipped.append(path)
      continue
    label = class_index[rel.split(os.sep, 1)[0]] if fc.class_from_subfolder else 0
    good.append((rel, path, label))
  if skipped and (root, tuple(skipped)) not in _warned_skips:
    _warned_skips.add((root, tuple(skipped)))
    logging.warning("folder dataset: skipped %d unreadable image(s) in %s, e.g. %s",
                    len(skipped), root, skipped[:5])
  if not good:
    raise ValueError(f"folder dataset: none of the {len(files)} image files in {root} "
                     "could be read")
  # Split: rank files by a hash of their relative path and hold out the first
  # round(val_fraction * N); stable across machines and independent of order.
  num_val = int(round(float(fc.val_fraction) * len(good)))
  ranked = sorted(range(len(good)), key=lambda i: _path_rank_key(good[i][0]))
  val_ids = set(ranked[:num_val])
  train = tuple((p, l) for i, (_, p, l) in enumerate(good) if i not in val_ids)
  val = tuple((p, l) for i, (_, p, l) in enumerate(good) if i in val_ids)
  return FolderScan(class_names, train, val, tuple(skipped))


def folder_skipped_files(data_config) -> tuple:
  """Paths the folder source skips as unreadable (also in dataset_info)."""
  return scan_folder(data_config.folder).skipped


@dataclasses.dataclass(frozen=True)
class _FolderTrain(grain.transforms.RandomMap):
  size: int
  flip: bool

  def random_map(self, element, rng: np.random.Generator):
    path, label = element
    image = resize_short_side(decode_image(path, self.size), self.size)
    return _example(_random_crop_flip(image, self.size, self.flip, rng), label)


@dataclasses.dataclass(frozen=True)
class _FolderEval(grain.transforms.Map):
  size: int

  def map(self, element):
    if _is_pad(element):
      return _padding_example(self.size)
    path, label = element
    image = resize_short_side(decode_image(path, self.size), self.size)
    return _example(_center_crop(image, self.size), label, mask=True)


def _random_crop_flip(image, size, flip, rng):
  y, x = random_window(image.shape[0], image.shape[1], size, rng)
  image = image[y:y + size, x:x + size]
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return image


def _center_crop(image, size):
  y, x = center_window(image.shape[0], image.shape[1], size)
  return image[y:y + size, x:x + size]


def _padding_example(size):
  return _example(np.zeros((size, size, 3), np.uint8), 0, mask=False)


# ----------------------------------------------------------------------------
# TFDS.


def tfds_source(tc, split: str):
  import tensorflow_datasets as tfds  # Lazy: heavy import, only needed here.
  data_dir = tc.tfds_data_dir or None
  try:
    return tfds.data_source(tc.tfds_name, split=split, data_dir=data_dir, download=False)
  except Exception as err:  # pylint: disable=broad-except
    # tfds words this failure differently with and without data_dir (NotImplementedError
    # "Random access data source ... not supported" / ValueError "File format
    # array_record does not match"); look at what is on disk instead.
    message = _tfds_sequential_only_message(tfds, tc.tfds_name, tc.tfds_data_dir)
    if message is None:
      raise
    raise ValueError(message) from err


def _tfds_sequential_only_message(tfds, name: str, data_dir: str) -> str | None:
  """The error text for a TFDS dataset prepared only in formats tfds.data_source cannot
  read (TFRecord, the default of many builders), or None if that is not the case (or
  cannot be told: then the original error stands)."""
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
    formats = {f.value for f in builder.info.available_file_formats()}
    readable = {f.value for f in tfds.core.file_adapters.FileFormat.with_random_access()}
    version_dir = str(builder.data_dir)
  except Exception:  # pylint: disable=broad-except
    return None
  if not formats or formats & readable:
    return None
  root = data_dir or f"{tfds.core.constants.DATA_DIR} (the TFDS default)"
  data_dir_flag = f" --data_dir={data_dir}" if data_dir else ""
  return (
      f"tfds dataset {name!r} in data_dir {root} is prepared at {version_dir} only as "
      f"{', '.join(sorted(formats))}, but the input pipeline reads TFDS through "
      f"tfds.data_source, which needs random access: {' or '.join(sorted(readable))}. "
      "Add ArrayRecord shards beside the existing ones (the data_dir stays the same):\n"
      f"  tfds convert_format --dataset_version_dir={version_dir} "
      "--out_file_format=array_record\n"
      "or prepare the dataset again as ArrayRecord:\n"
      f"  tfds build {name}{data_dir_flag} --file_format=array_record --overwrite\n"
      "(the `tfds` command of tensorflow-datasets 4.9 imports apache_beam at start-up: "
      "pip install apache-beam first).")


def tfds_label(example, label_key: str) -> int:
  return int(np.asarray(example[label_key])) if label_key else 0


@dataclasses.dataclass(frozen=True)
class _TfdsTrain(grain.transforms.RandomMap):
  source: Any
  image_key: str
  label_key: str
  size: int
  flip: bool

  def random_map(self, element, rng: np.random.Generator):
    ex = self.source[element]
    image = resize_short_side(to_rgb_uint8(ex[self.image_key]), self.size)
    return _example(_random_crop_flip(image, self.size, self.flip, rng),
                    tfds_label(ex, self.label_key))


@dataclasses.dataclass(frozen=True)
class _TfdsEval(grain.transforms.Map):
  source: Any
  image_key: str
  label_key: str
  size: int

  def map(self, element):
    if _is_pad(element):
      return _padding_example(self.size)
    ex = self.source[element]
    image = resize_short_side(to_rgb_uint8(ex[self.image_key]), self.size)
    return _example(_center_crop(image, self.size), tfds_label(ex, self.label_key),
                    mask=True)


# ----------------------------------------------------------------------------
# Records, info and iterators.

_NAMES = ("photos", "folder", "tfds")


def _check_name(dc):
  if dc.name not in _NAMES:
    raise ValueError(f"data.name must be one of {_NAMES}, got {dc.name!r}")
  if int(dc.image_size) <= 0:
    raise ValueError(f"data.image_size must be positive, got {dc.image_size}")


def _train_records_and_transform(dc):
  """(records, RandomMap) for the training split of the configured source."""
  _check_name(dc)
  size, flip = int(dc.image_size), bool(dc.random_flip)
  if dc.name == "photos":
    photos = _photos_from_config(dc)
    n = int(dc.photos.train_examples_per_epoch)
    if n <= 0:
      raise ValueError("photos.train_examples_per_epoch must be positive")
    # Record i is photo i % P: every photo is equally frequent in an epoch.
    return [i % len(photos) for i in range(n)], _PhotoTrain(flip=flip, **_photo_args(dc))
  if dc.name == "folder":
    scan = scan_folder(dc.folder)
    if not scan.train:
      raise ValueError(f"folder dataset: no training images in {dc.folder.folder_path} "
                       f"(val_fraction={dc.folder.val_fraction})")
    return list(scan.train), _FolderTrain(size, flip)
  tc = dc.tfds
  source = tfds_source(tc, tc.train_split)
  return list(range(len(source))), _TfdsTrain(source, tc.image_key, tc.label_key, size, flip)


def _eval_records_and_transform(dc):
  """(records, Map accepting a record or _PAD) for the val split."""
  _check_name(dc)
  size = int(dc.image_size)
  if dc.name == "photos":
    records = [(i, y, x) for i, p in enumerate(_photos_from_config(dc))
               for (y, x, _, _) in p.val_windows]
    return records, _PhotoEval(**_photo_args(dc))
  if dc.name == "folder":
    return list(scan_folder(dc.folder).val), _FolderEval(size)
  tc = dc.tfds
  source = tfds_source(tc, tc.val_split)
  return list(range(len(source))), _TfdsEval(source, tc.image_key, tc.label_key, size)


def dataset_info(data_config) -> dict:
  """Describes the configured source.

  Returns {'num_classes', 'class_names', 'num_segments' (0 without maps),
  'num_train' (photos: the virtual epoch length), 'num_val' (examples in one
  eval pass over all processes, padding excluded), 'num_skipped' (unreadable
  folder files; 0 otherwise)}.
  """
  dc = data_config
  _check_name(dc)
  if dc.name == "photos":
    photos = _photos_from_config(dc)
    return {"num_classes": len(photos), "class_names": [p.name for p in photos],
            "num_segments": int(dc.photos.num_segments),
            "num_train": int(dc.photos.train_examples_per_epoch),
            "num_val": sum(len(p.val_windows) for p in photos), "num_skipped": 0}
  if dc.name == "folder":
    scan = scan_folder(dc.folder)
    return {"num_classes": len(scan.class_names), "class_names": list(scan.class_names),
            "num_segments": 0, "num_train": len(scan.train), "num_val": len(scan.val),
            "num_skipped": len(scan.skipped)}
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
  return {"num_classes": len(class_names), "class_names": class_names, "num_segments": 0,
          "num_train": len(train), "num_val": len(val), "num_skipped": 0}


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
  shard = shard + [_PAD] * (num_batches * batch_size - len(shard))
  ds = grain.MapDataset.source(shard).map(transform).batch(batch_size)
  return _to_iter(ds, int(data_config.num_workers))
