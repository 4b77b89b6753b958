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
  "seg_folder"  image / label-map pairs laid out as ADE20K, COCO-Stuff and
            S-FLCKR-style sets ship them: <root>/images/<name>.jpg|png with
            <root>/labels/<name>.png, a single-channel PNG of class ids. Every
            crop carries the map as 'segmentation' (ids as `label_maps` says),
            cropped and flipped with the image. Pairs are checked up front like
            the folder source's files (docs/data.md#segmentation-pairs).
  "tfds"    a prepared TFDS dataset read through `tfds.data_source` (ArrayRecord);
            with `tfds.mask_key` its segmentation-mask feature becomes the
            'segmentation' map.

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
  folder_skipped_files(data_config)     files the folder / seg_folder source skips
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
  # Which source: "photos" (bundled scikit-image photos), "folder", "seg_folder" (image +
  # label-map pairs) or "tfds".
  c.name = "photos"
  # Side of the square crops fed to the model.
  c.image_size = 32
  # Random horizontal flips for training (never applied to evaluation).
  c.random_flip = True
  # 0: load in the main process (threads); >0: that many grain worker processes.
  c.num_workers = 0
  # What a stage-1 model encodes: "image" (RGB) or "segmentation" (one-hot condition
  # maps, for a conditioning VQGAN with in_channels = out_ch = segment_classes(data):
  # photos.num_segments, or the label_maps classes of seg_folder / tfds with a mask_key).
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
  # Feature key of a segmentation mask (integer ids, same height and width as the image,
  # e.g. "segmentation_mask"); it becomes the 'segmentation' map, with ids as label_maps
  # says. Empty = no maps.
  c.tfds.mask_key = ""

  c.seg_folder = ml_collections.ConfigDict()
  # Dataset root: <root>/<image_dir>/<name>.jpg|jpeg|png pairs with
  # <root>/<label_dir>/<name>.png (sub-folders allowed: the relative path without its
  # extension is the pair's name). Layout and commands: docs/data.md#segmentation-pairs.
  c.seg_folder.folder_path = ""
  c.seg_folder.image_dir = "images"    # ADE20K's own layout: "images" / "annotations"
  c.seg_folder.label_dir = "labels"
  # True: a bad pair (unreadable image or map, missing map, map not single-channel, map and
  # image of different sizes, ids outside label_maps) is an error naming the file; False:
  # skipped, counted (dataset_info 'num_skipped') and logged once.
  c.seg_folder.strict = False
  # Fraction of pairs for validation, chosen by ranking names on a hash (as "folder").
  c.seg_folder.val_fraction = 0.05

  # Class ids of the label maps of "seg_folder" and of "tfds" with a mask_key (the photos'
  # colour clusters use photos.num_segments instead).
  c.label_maps = ml_collections.ConfigDict()
  # Ids 0 .. num_classes - 1 are classes; required (> 0) for a source with label maps.
  c.label_maps.num_classes = 0
  # The id of unlabelled pixels (COCO-Stuff, S-FLCKR, VOC: 255); -1 = none. Any other id
  # outside [0, num_classes) makes the pair bad.
  c.label_maps.ignore_label = 255
  # Where ignore_label pixels go: "extra" = their own "unlabelled" class, id num_classes
  # (the maps then have num_classes + 1 ids: the conditioning VQGAN sees where nothing is
  # known and the GPT learns to fill it in); "zero" = class 0, for sets whose class 0
  # already means background/other (VOC's boundary pixels become background).
  c.label_maps.ignore_as = "extra"
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


def short_side_shape(h: int, w: int, size: int) -> tuple:
  """(height, width) after resizing (h, w) so that the shorter side is `size`."""
  if min(h, w) == size:
    return h, w
  if h <= w:
    return size, max(size, round(w * size / h))
  return max(size, round(h * size / w)), size


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes (bicubic, antialiased by PIL) so that the shorter side is `size`."""
  return resize_image_to(image, short_side_shape(image.shape[0], image.shape[1], size))


def resize_image_to(image: np.ndarray, shape) -> np.ndarray:
  """Resizes a uint8 RGB image to (height, width) `shape` (bicubic, antialiased by PIL)."""
  new_h, new_w = shape
  if image.shape[:2] == (new_h, new_w):
    return image
  resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
  return np.asarray(resized)


def resize_nearest(label_map: np.ndarray, shape) -> np.ndarray:
  """Resizes a (H, W) map of class ids to (height, width) `shape` by nearest neighbour.

  Ids must never be blended (a bicubic mean of classes 3 and 7 is not class 5), so each
  output pixel takes the id at its centre's position in the input, the same
  centre-aligned coordinates PIL's image resampling uses: the map stays on the image.
  """
  h, w = label_map.shape[:2]
  new_h, new_w = shape
  if (h, w) == (new_h, new_w):
    return label_map
  rows = np.minimum(((np.arange(new_h) + 0.5) * (h / new_h)).astype(np.int64), h - 1)
  cols = np.minimum(((np.arange(new_w) + 0.5) * (w / new_w)).astype(np.int64), w - 1)
  return label_map[rows[:, None], cols[None, :]]


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
  """Paths the folder (unreadable images) or seg_folder (bad pairs, by image path) source
  skips; their count is dataset_info's 'num_skipped'."""
  if data_config.name == "seg_folder":
    return scan_seg_folder(data_config.seg_folder, label_spec(data_config)).skipped
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
  return _random_crop_flip_pair(image, None, size, flip, rng)[0]


def _random_crop_flip_pair(image, label_map, size, flip, rng):
  """One random window and flip applied to an image and (if not None) its label map.

  Draws exactly what the image-only path draws (window, then the flip coin), so a
  source's crops do not change with whether it carries maps.
  """
  y, x = random_window(image.shape[0], image.shape[1], size, rng)
  image = image[y:y + size, x:x + size]
  if label_map is not None:
    label_map = label_map[y:y + size, x:x + size]
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
    if label_map is not None:
      label_map = label_map[:, ::-1]
  return image, label_map


def _center_crop(image, size):
  y, x = center_window(image.shape[0], image.shape[1], size)
  return image[y:y + size, x:x + size]


def _padding_example(size, segmentation: bool = False):
  seg = np.zeros((size, size), np.int32) if segmentation else None
  return _example(np.zeros((size, size, 3), np.uint8), 0, seg, mask=False)


# ----------------------------------------------------------------------------
# Label maps (seg_folder, tfds with a mask_key).

IGNORE_AS = ("extra", "zero")
# PIL modes of single-channel images whose pixel values are the ids themselves ("P":
# palette indices, as in VOC-style maps; "I;16*": 16-bit PNGs for sets of > 256 classes).
LABEL_MAP_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """How the raw values of a label map become class ids (config.data.label_maps).

  Raw ids 0 .. num_classes - 1 are kept; `ignore_label` (if >= 0) becomes id
  `num_classes` ("extra": a class of its own) or 0 ("zero"); anything else is an error,
  because a stray id would silently fall outside the conditioning VQGAN's one-hot
  channels (jax.nn.one_hot maps it to all zeros).
  """
  num_classes: int
  ignore_label: int = -1
  ignore_as: str = "extra"

  @property
  def num_ids(self) -> int:
    """Ids in the converted maps: the one-hot channels of a conditioning VQGAN."""
    return self.num_classes + int(self.ignore_label >= 0 and self.ignore_as == "extra")

  def to_ids(self, raw) -> np.ndarray:
    """int32 (H, W) ids of a raw map (H, W) or (H, W, 1); ValueError on a bad map."""
    a = np.asarray(raw)
    if a.ndim == 3 and a.shape[-1] == 1:
      a = a[..., 0]
    if a.ndim != 2:
      raise ValueError(f"a label map must be single-channel (H, W), got shape {a.shape}")
    if a.dtype == np.bool_:
      a = a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"label ids must be integers, got dtype {a.dtype}")
    ids = a.astype(np.int64)
    n, ignore = self.num_classes, self.ignore_label
    ignored = ids == ignore if ignore >= 0 else np.zeros(ids.shape, bool)
    bad = ((ids < 0) | (ids >= n)) & ~ignored
    if bad.any():
      values = np.unique(ids[bad])
      shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
      raise ValueError(f"ids {shown} are neither classes 0..{n - 1} "
                       f"(data.label_maps.num_classes={n}) nor "
                       f"data.label_maps.ignore_label={ignore}")
    out = ids.astype(np.int32)
    if ignore >= 0:
      out[ignored] = n if self.ignore_as == "extra" else 0
    return out


def label_spec(data_config) -> LabelSpec:
  """The checked `label_maps` of a config (ValueError naming the key)."""
  lm = data_config.label_maps
  n, ignore, ignore_as = int(lm.num_classes), int(lm.ignore_label), str(lm.ignore_as)
  if n < 1:
    raise ValueError(
        f"config.data.label_maps.num_classes={n}: data.name={data_config.name!r} reads "
        "label maps, so set the number of classes (ids 0..num_classes-1 in the maps)")
  if ignore_as not in IGNORE_AS:
    raise ValueError(f"config.data.label_maps.ignore_as={ignore_as!r}: must be one of "
                     f"{IGNORE_AS}")
  if 0 <= ignore < n:
    raise ValueError(
        f"config.data.label_maps.ignore_label={ignore}: that is class {ignore} of "
        f"data.label_maps.num_classes={n}; use an id outside the classes, or -1 for none")
  if ignore < -1:
    raise ValueError(f"config.data.label_maps.ignore_label={ignore}: must be >= 0, or -1 "
                     "for none")
  return LabelSpec(n, ignore, ignore_as)


def decode_label_map(path: str) -> np.ndarray:
  """Decodes a single-channel label-map image into its raw integer ids (H, W).

  EXIF orientation is applied, as decode_image does for the image, so a pair stays
  aligned whichever of the two files carries the tag.
  """
  with Image.open(path) as img:
    img = ImageOps.exif_transpose(img)
    img.load()
    if img.mode not in LABEL_MAP_MODES:
      raise ValueError(f"a label map must be a single-channel image of class ids (PIL mode "
                       f"L, P, I;16 or I), not mode {img.mode!r}; convert colour-coded "
                       "maps to ids first")
    return np.asarray(img)


def resize_pair(image: np.ndarray, label_map: np.ndarray, size: int) -> tuple:
  """(image, ids) resized so that the shorter side is `size`: bicubic for the image,
  nearest neighbour for the ids, both to the shape the map's size gives.

  The target shape comes from the map because the image may arrive smaller (JPEG draft
  decoding): both then cover the same field of view at exactly the same shape.
  """
  shape = short_side_shape(label_map.shape[0], label_map.shape[1], size)
  return resize_image_to(image, shape), resize_nearest(label_map, shape)


def load_seg_pair(image_path: str, label_path: str, spec: LabelSpec, size: int) -> tuple:
  """(uint8 image (h, w, 3), int32 ids (h, w)) of one pair, shorter side `size`."""
  ids = spec.to_ids(decode_label_map(label_path))
  return resize_pair(decode_image(image_path, size), ids, size)


# ----------------------------------------------------------------------------
# Image / label-map folder.


class SegFolderScan(NamedTuple):
  root: str
  train: tuple      # ((image path, label-map path), ...) sorted by relative path
  val: tuple
  skipped: tuple    # image paths of bad pairs


# (image key, label key, spec) -> None if the pair is usable, else what is wrong; keys
# are (path, size, mtime_ns), so repeated scans check each pair once.
_pair_cache: dict = {}


def _file_key(path: str):
  st = os.stat(path)
  return (path, st.st_size, st.st_mtime_ns)


def _oriented_image_size(path: str) -> tuple:
  """(h, w) of an image after EXIF orientation; decodes it to catch truncated files."""
  with Image.open(path) as img:
    w, h = img.size
    if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # transposed or rotated by 90
      h, w = w, h
    if img.format == "JPEG":  # as _check_readable: reads all, skips most of the IDCT
      img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
    img.load()
  return h, w


def _check_pair(image_path: str, label_path: str, spec: LabelSpec) -> str | None:
  """None if the pair is usable, else what is wrong with it, naming the file."""
  try:
    image_key = _file_key(image_path)
  except OSError as e:  # e.g. a dangling symlink
    return f"cannot read image {image_path}: {type(e).__name__}: {e}"
  try:
    label_key = _file_key(label_path)
  except OSError:
    return f"no label map {label_path} for image {image_path}"
  key = (image_key, label_key, spec)
  if key not in _pair_cache:
    _pair_cache[key] = _pair_problem(image_path, label_path, spec)
  return _pair_cache[key]


def _pair_problem(image_path: str, label_path: str, spec: LabelSpec) -> str | None:
  try:
    h, w = _oriented_image_size(image_path)
  except Exception as e:  # pylint: disable=broad-except
    return f"cannot read image {image_path}: {type(e).__name__}: {e}"
  try:
    raw = decode_label_map(label_path)
  except Exception as e:  # pylint: disable=broad-except
    return f"cannot read label map {label_path}: {type(e).__name__}: {e}"
  if raw.shape[:2] != (h, w):
    return (f"label map {label_path} is {raw.shape[1]}x{raw.shape[0]} but image "
            f"{image_path} is {w}x{h} (width x height)")
  try:
    spec.to_ids(raw)
  except ValueError as e:
    return f"label map {label_path}: {e}"
  return None


def scan_seg_folder(sc, spec: LabelSpec) -> SegFolderScan:
  """Pairs, checks and splits an image / label-map folder (checks are cached).

  Every image under <root>/<image_dir> is paired with <root>/<label_dir>/<same relative
  path>.png; label maps without an image are not used. A bad pair raises (strict) or is
  skipped and counted, as the folder source does with unreadable images.
  """
  if not sc.folder_path:
    raise ValueError("config.data.seg_folder.folder_path='': set it to the dataset root, "
                     f"the folder that holds {sc.image_dir}/ and {sc.label_dir}/")
  root = os.path.abspath(os.path.expanduser(str(sc.folder_path)))
  if not os.path.isdir(root):
    raise ValueError(f"config.data.seg_folder.folder_path={sc.folder_path!r} is not a "
                     "directory")
  image_root = os.path.join(root, str(sc.image_dir))
  label_root = os.path.join(root, str(sc.label_dir))
  for what, folder in (("image_dir", image_root), ("label_dir", label_root)):
    if not os.path.isdir(folder):
      raise ValueError(f"seg_folder dataset: no folder {folder} (config.data.seg_folder."
                       f"{what}={sc[what]!r} under folder_path {root})")
  files = []
  for dirpath, dirnames, filenames in os.walk(image_root, followlinks=True):
    dirnames.sort()
    for f in filenames:
      if f.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.relpath(os.path.join(dirpath, f), image_root))
  files.sort()
  if not files:
    raise ValueError(f"seg_folder dataset: no .jpg/.jpeg/.png images found in {image_root}")
  pairs = [(os.path.join(image_root, rel),
            os.path.join(label_root, os.path.splitext(rel)[0] + ".png")) for rel in files]
  with concurrent.futures.ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
    problems = list(pool.map(lambda pair: _check_pair(*pair, spec), pairs))
  good, skipped, reasons = [], [], []
  for rel, pair, problem in zip(files, pairs, problems):
    if problem is not None:
      if sc.strict:
        raise ValueError(f"seg_folder dataset: bad pair: {problem} (config.data.seg_folder."
                         "strict=True; False skips bad pairs)")
      skipped.append(pair[0])
      reasons.append(problem)
      continue
    good.append((rel, pair))
  if skipped and (root, tuple(skipped)) not in _warned_skips:
    _warned_skips.add((root, tuple(skipped)))
    logging.warning("seg_folder dataset: skipped %d bad pair(s) in %s, e.g. %s",
                    len(skipped), root, "; ".join(reasons[:5]))
  if not good:
    raise ValueError(f"seg_folder dataset: none of the {len(files)} pairs in {root} is "
                     f"usable, e.g. {reasons[0]}")
  # The folder source's split: a hash of the relative path ranks the pairs.
  num_val = int(round(float(sc.val_fraction) * len(good)))
  ranked = sorted(range(len(good)), key=lambda i: _path_rank_key(good[i][0]))
  val_ids = set(ranked[:num_val])
  train = tuple(pair for i, (_, pair) in enumerate(good) if i not in val_ids)
  val = tuple(pair for i, (_, pair) in enumerate(good) if i in val_ids)
  return SegFolderScan(root, train, val, tuple(skipped))


@dataclasses.dataclass(frozen=True)
class _SegFolderTrain(grain.transforms.RandomMap):
  """Record = (image path, label path) -> random crop (and flip) of both, label 0."""
  spec: LabelSpec
  size: int
  flip: bool

  def random_map(self, element, rng: np.random.Generator):
    image, ids = load_seg_pair(element[0], element[1], self.spec, self.size)
    image, ids = _random_crop_flip_pair(image, ids, self.size, self.flip, rng)
    return _example(image, 0, ids)


@dataclasses.dataclass(frozen=True)
class _SegFolderEval(grain.transforms.Map):
  spec: LabelSpec
  size: int

  def map(self, element):
    if _is_pad(element):
      return _padding_example(self.size, segmentation=True)
    image, ids = load_seg_pair(element[0], element[1], self.spec, self.size)
    return _example(_center_crop(image, self.size), 0, _center_crop(ids, self.size),
                    mask=True)


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


def tfds_pair(example, image_key: str, mask_key: str, spec: LabelSpec | None, size: int,
              where: str) -> tuple:
  """(uint8 image, int32 ids or None) of a TFDS example, shorter side resized to `size`.

  With a `mask_key` the mask is converted with `spec` and resized with the image
  (resize_pair); a bad mask raises a ValueError that names the example (`where`): TFDS
  records are not checked up front, so there is nothing to skip them by.
  """
  image = to_rgb_uint8(example[image_key])
  if not mask_key:
    return resize_short_side(image, size), None
  try:
    ids = spec.to_ids(example[mask_key])
  except ValueError as e:
    raise ValueError(f"{where}: feature {mask_key!r}: {e}") from None
  if ids.shape != image.shape[:2]:
    raise ValueError(f"{where}: mask {mask_key!r} is {ids.shape[1]}x{ids.shape[0]} but image "
                     f"{image_key!r} is {image.shape[1]}x{image.shape[0]} (width x height)")
  return resize_pair(image, ids, size)


@dataclasses.dataclass(frozen=True)
class _TfdsTrain(grain.transforms.RandomMap):
  source: Any
  image_key: str
  label_key: str
  size: int
  flip: bool
  mask_key: str = ""
  spec: LabelSpec | None = None
  where: str = "tfds"

  def random_map(self, element, rng: np.random.Generator):
    ex = self.source[element]
    image, ids = tfds_pair(ex, self.image_key, self.mask_key, self.spec, self.size,
                           f"{self.where} example {element}")
    image, ids = _random_crop_flip_pair(image, ids, self.size, self.flip, rng)
    return _example(image, tfds_label(ex, self.label_key), ids)


@dataclasses.dataclass(frozen=True)
class _TfdsEval(grain.transforms.Map):
  source: Any
  image_key: str
  label_key: str
  size: int
  mask_key: str = ""
  spec: LabelSpec | None = None
  where: str = "tfds"

  def map(self, element):
    if _is_pad(element):
      return _padding_example(self.size, segmentation=bool(self.mask_key))
    ex = self.source[element]
    image, ids = tfds_pair(ex, self.image_key, self.mask_key, self.spec, self.size,
                           f"{self.where} example {element}")
    ids = _center_crop(ids, self.size) if ids is not None else None
    return _example(_center_crop(image, self.size), tfds_label(ex, self.label_key), ids,
                    mask=True)


def _tfds_transform_args(dc, split: str) -> dict:
  """The mask arguments of the TFDS transforms (none without tfds.mask_key)."""
  tc = dc.tfds
  mask_key = str(tc.get("mask_key", ""))
  return dict(mask_key=mask_key, spec=label_spec(dc) if mask_key else None,
              where=f"tfds {tc.tfds_name} split {split}")


# ----------------------------------------------------------------------------
# Records, info and iterators.

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
    if not sc.folder_path:
      raise ValueError(
          "config.data.seg_folder.folder_path='': data.name='seg_folder' needs the dataset "
          f"root, the folder that holds {sc.image_dir}/ and {sc.label_dir}/ "
          "(docs/data.md#segmentation-pairs)")
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
  if dc.name == "seg_folder":
    spec = label_spec(dc)
    scan = scan_seg_folder(dc.seg_folder, spec)
    if not scan.train:
      raise ValueError(f"seg_folder dataset: no training pairs in {scan.root} "
                       f"(config.data.seg_folder.val_fraction={dc.seg_folder.val_fraction})")
    return list(scan.train), _SegFolderTrain(spec, size, flip)
  tc = dc.tfds
  source = tfds_source(tc, tc.train_split)
  return list(range(len(source))), _TfdsTrain(source, tc.image_key, tc.label_key, size, flip,
                                              **_tfds_transform_args(dc, tc.train_split))


def _eval_records_and_transform(dc):
  """(records, Map accepting a record or _PAD) for the val split."""
  check_data_config(dc)
  size = int(dc.image_size)
  if dc.name == "photos":
    records = [(i, y, x) for i, p in enumerate(_photos_from_config(dc))
               for (y, x, _, _) in p.val_windows]
    return records, _PhotoEval(**_photo_args(dc))
  if dc.name == "folder":
    return list(scan_folder(dc.folder).val), _FolderEval(size)
  if dc.name == "seg_folder":
    spec = label_spec(dc)
    return list(scan_seg_folder(dc.seg_folder, spec).val), _SegFolderEval(spec, size)
  tc = dc.tfds
  source = tfds_source(tc, tc.val_split)
  return list(range(len(source))), _TfdsEval(source, tc.image_key, tc.label_key, size,
                                             **_tfds_transform_args(dc, tc.val_split))


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
    segs.append(np.ascontiguousarray(_center_crop(ids, size), np.int32))
    images.append(to_float(_center_crop(image, size)))
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
  shard = shard + [_PAD] * (num_batches * batch_size - len(shard))
  ds = grain.MapDataset.source(shard).map(transform).batch(batch_size)
  return _to_iter(ds, int(data_config.num_workers))
