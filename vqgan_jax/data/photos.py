"""The bundled scikit-image photos source (config.data.name "photos", no download).

Each photo is one class; training draws random crops from one region of each photo and
evaluation uses a fixed grid of crops from a disjoint region. Every crop also carries a
'segmentation' map (a colour clustering of the photo) for spatially conditioned stage-2
models. Photos are downscaled to `photo_short_side`; the val region is the far end of the
longer side (see _split_boxes, segment_photos).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import NamedTuple

import grain
import numpy as np

from vqgan_jax.data.images import (grid_windows, is_pad, make_example, random_window,
                                   resize_short_side, to_rgb_uint8)

# The photographs scikit-image ships in its package data (all load offline with
# scikit-image 0.26). Order fixes the class index.
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
               "immunohistochemistry", "retina")
# k-means settings for the photos' segmentation maps. Fixed so that the maps
# are identical in every process and on every run.
_KMEANS_SEED = 0
_KMEANS_ITERS = 25
_KMEANS_MAX_SAMPLES = 32768


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


@functools.lru_cache(maxsize=None)
def segment_photos(short_side: int, num_segments: int) -> tuple:
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
def prepare_photos(short_side: int, val_fraction: float, num_segments: int,
                   image_size: int) -> tuple:
  """The photos with segmentation maps and train/val regions; cached per process."""
  photos, _ = _load_source_photos(short_side)
  segmentations = segment_photos(short_side, num_segments)
  prepared = []
  for (name, image), seg in zip(photos, segmentations):
    h, w = image.shape[:2]
    train_box, val_box = _split_boxes(h, w, val_fraction, image_size, name)
    prepared.append(Photo(name, image, seg, train_box, val_box,
                          grid_windows(val_box, image_size)))
  return tuple(prepared)


def _photos_from_config(dc) -> tuple:
  p = dc.photos
  return prepare_photos(int(p.photo_short_side), float(p.val_fraction),
                        int(p.num_segments), int(dc.image_size))


def photo_layout(data_config) -> tuple:
  """The prepared photos (tuple of `Photo`) for this config, e.g. for tests and plots."""
  return _photos_from_config(data_config)


@dataclasses.dataclass(frozen=True)
class PhotoTrain(grain.transforms.RandomMap):
  """Record = photo index -> random crop (and flip) inside its train box."""
  short_side: int
  val_fraction: float
  num_segments: int
  size: int
  flip: bool

  def random_map(self, element, rng: np.random.Generator):
    photo = prepare_photos(self.short_side, self.val_fraction, self.num_segments,
                           self.size)[element]
    by, bx, bh, bw = photo.train_box
    dy, dx = random_window(bh, bw, self.size, rng)
    y, x = by + dy, bx + dx
    image = photo.image[y:y + self.size, x:x + self.size]
    seg = photo.segmentation[y:y + self.size, x:x + self.size]
    if self.flip and rng.random() < 0.5:
      image, seg = image[:, ::-1], seg[:, ::-1]
    return make_example(image, element, seg)


@dataclasses.dataclass(frozen=True)
class PhotoEval(grain.transforms.Map):
  """Record = (photo index, y, x) or PAD -> fixed crop."""
  short_side: int
  val_fraction: float
  num_segments: int
  size: int

  def map(self, element):
    s = self.size
    if is_pad(element):
      return make_example(np.zeros((s, s, 3), np.uint8), 0, np.zeros((s, s), np.int32),
                          False)
    i, y, x = element
    photo = prepare_photos(self.short_side, self.val_fraction, self.num_segments,
                           self.size)[i]
    return make_example(photo.image[y:y + s, x:x + s], i,
                        photo.segmentation[y:y + s, x:x + s], True)


def photo_args(dc):
  p = dc.photos
  return dict(short_side=int(p.photo_short_side), val_fraction=float(p.val_fraction),
              num_segments=int(p.num_segments), size=int(dc.image_size))
