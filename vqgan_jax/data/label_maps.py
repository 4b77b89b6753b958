"""Label maps (seg_folder, tfds with a mask_key): raw ids -> class ids (`LabelSpec`, from
config.data.label_maps), decoding, and resizing an image / map pair together.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageOps

from vqgan_jax.data.images import decode_image, resize_image_to, resize_nearest, short_side_shape

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
