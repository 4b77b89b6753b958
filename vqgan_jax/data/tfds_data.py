"""The TFDS source (config.data.name "tfds"): a prepared TFDS dataset read through
`tfds.data_source` (ArrayRecord); with `tfds.mask_key` its segmentation-mask feature becomes
the 'segmentation' map. A dataset prepared only as TFRecord is an error that says how to
convert it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from vqgan_jax.data.images import (center_crop, is_pad, make_example, padding_example,
                                   random_crop_flip_pair, resize_short_side, to_rgb_uint8)
from vqgan_jax.data.label_maps import LabelSpec, label_spec, resize_pair


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
class TfdsTrain(grain.transforms.RandomMap):
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
    image, ids = random_crop_flip_pair(image, ids, self.size, self.flip, rng)
    return make_example(image, tfds_label(ex, self.label_key), ids)


@dataclasses.dataclass(frozen=True)
class TfdsEval(grain.transforms.Map):
  source: Any
  image_key: str
  label_key: str
  size: int
  mask_key: str = ""
  spec: LabelSpec | None = None
  where: str = "tfds"

  def map(self, element):
    if is_pad(element):
      return padding_example(self.size, segmentation=bool(self.mask_key))
    ex = self.source[element]
    image, ids = tfds_pair(ex, self.image_key, self.mask_key, self.spec, self.size,
                           f"{self.where} example {element}")
    ids = center_crop(ids, self.size) if ids is not None else None
    return make_example(center_crop(image, self.size), tfds_label(ex, self.label_key), ids,
                        mask=True)


def tfds_transform_args(dc, split: str) -> dict:
  """The mask arguments of the TFDS transforms (none without tfds.mask_key)."""
  tc = dc.tfds
  mask_key = str(tc.get("mask_key", ""))
  return dict(mask_key=mask_key, spec=label_spec(dc) if mask_key else None,
              where=f"tfds {tc.tfds_name} split {split}")
