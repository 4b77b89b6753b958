"""What every image source shares: the `config.data` defaults, decoding and resizing,
crop windows, and the example dicts the transforms return.

uint8 -> float32 is x / 127.5 - 1 into [-1, 1], as in the taming-transformers reference.
The sources are `photos`, `folders` (image folders and image / label-map pair folders) and
`tfds_data`; `label_maps` converts label-map ids; `pipeline` dispatches over the sources.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np
from PIL import Image, ImageOps

# Eval records that only fill up the last batch. Not None: grain treats None
# elements as filtered out and would drop them from the batch.
PAD = "<padding>"


def is_pad(element) -> bool:
  return isinstance(element, str) and element == PAD


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


def grid_windows(box, size: int):
  """Non-overlapping size x size windows tiling `box`, centred (row-major)."""
  by, bx, bh, bw = box
  rows, cols = bh // size, bw // size
  y0 = by + (bh - rows * size) // 2
  x0 = bx + (bw - cols * size) // 2
  return tuple((y0 + r * size, x0 + c * size, size, size)
               for r in range(rows) for c in range(cols))


# ----------------------------------------------------------------------------
# Crops, flips and the example dicts the transforms return.


def random_crop_flip(image, size, flip, rng):
  return random_crop_flip_pair(image, None, size, flip, rng)[0]


def random_crop_flip_pair(image, label_map, size, flip, rng):
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


def center_crop(image, size):
  y, x = center_window(image.shape[0], image.shape[1], size)
  return image[y:y + size, x:x + size]


def make_example(image: np.ndarray, label: int, segmentation=None, mask=None):
  ex = {"image": to_float(image), "label": np.int32(label)}
  if segmentation is not None:
    ex["segmentation"] = segmentation.astype(np.int32)
  if mask is not None:
    ex["mask"] = np.bool_(mask)
  return ex


def padding_example(size, segmentation: bool = False):
  seg = np.zeros((size, size), np.int32) if segmentation else None
  return make_example(np.zeros((size, size, 3), np.uint8), 0, seg, mask=False)
