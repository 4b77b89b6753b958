"""The image-folder sources.

"folder": a directory of .jpg/.jpeg/.png files (optionally one sub-folder per class),
split deterministically into train and validation files. Every file is decoded once up
front (threaded, cached per process) so unreadable files are found before training; for
very large collections prefer "tfds".

"seg_folder": image / label-map pairs laid out as ADE20K, COCO-Stuff and S-FLCKR-style sets
ship them: <root>/images/<name>.jpg|png with <root>/labels/<name>.png, a single-channel PNG
of class ids. Every crop carries the map as 'segmentation' (ids as `label_maps` says),
cropped and flipped with the image. Pairs are checked up front like the folder source's
files (docs/data.md#segmentation-pairs).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import os
from typing import NamedTuple

import grain
import numpy as np
from PIL import Image

from vqgan_jax.data.images import (center_crop, decode_image, is_pad, make_example,
                                   padding_example, random_crop_flip, random_crop_flip_pair,
                                   resize_short_side)
from vqgan_jax.data.label_maps import LabelSpec, decode_label_map, label_spec, load_seg_pair

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


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
class FolderTrain(grain.transforms.RandomMap):
  size: int
  flip: bool

  def random_map(self, element, rng: np.random.Generator):
    path, label = element
    image = resize_short_side(decode_image(path, self.size), self.size)
    return make_example(random_crop_flip(image, self.size, self.flip, rng), label)


@dataclasses.dataclass(frozen=True)
class FolderEval(grain.transforms.Map):
  size: int

  def map(self, element):
    if is_pad(element):
      return padding_example(self.size)
    path, label = element
    image = resize_short_side(decode_image(path, self.size), self.size)
    return make_example(center_crop(image, self.size), label, mask=True)


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
class SegFolderTrain(grain.transforms.RandomMap):
  """Record = (image path, label path) -> random crop (and flip) of both, label 0."""
  spec: LabelSpec
  size: int
  flip: bool

  def random_map(self, element, rng: np.random.Generator):
    image, ids = load_seg_pair(element[0], element[1], self.spec, self.size)
    image, ids = random_crop_flip_pair(image, ids, self.size, self.flip, rng)
    return make_example(image, 0, ids)


@dataclasses.dataclass(frozen=True)
class SegFolderEval(grain.transforms.Map):
  spec: LabelSpec
  size: int

  def map(self, element):
    if is_pad(element):
      return padding_example(self.size, segmentation=True)
    image, ids = load_seg_pair(element[0], element[1], self.spec, self.size)
    return make_example(center_crop(image, self.size), 0, center_crop(ids, self.size),
                        mask=True)
