r"""Synthetic landscape scenes with label maps, written as a segmentation-pair folder.

  python -m vqgan_jax.data.scenes --output runs/scenes/data [--num_images 400] \
      [--height 48 --width 64] [--seed 0]

writes OUT/images/scene_00000.png ... and OUT/labels/scene_00000.png (single-channel PNGs
of class ids), the layout the "seg_folder" source reads (ADE20K, COCO-Stuff and
S-FLCKR-style sets ship the same way; docs/data.md#segmentation-pairs). It exists so that
spatial conditioning can be trained and checked on this machine, offline, on maps whose
classes have a meaning a person can see: every class is painted with its own colour and
texture, so a sample that follows its map is one whose sky is blue where the map says sky.

Classes (`CLASS_NAMES`): 0 sky, 1 water, 2 sand, 3 grass, 4 rock, 5 tree. Each scene is a
sky above a wavy horizon, then optionally water and a beach, then grass; rocks and trees
stand on the ground. A thin band of pixels along the horizon is `IGNORE_LABEL` (255), as
the boundary pixels of VOC-style sets are, so the ignore handling is exercised too.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from absl import flags
from PIL import Image

from vqgan_jax import cli

CLASS_NAMES = ("sky", "water", "sand", "grass", "rock", "tree")
IGNORE_LABEL = 255
# Base colour of each class (RGB), far apart so a reader (and a test) can tell them apart.
CLASS_COLORS = np.array([(105, 160, 235), (25, 70, 140), (225, 200, 135), (75, 150, 55),
                         (125, 120, 115), (25, 80, 35)], np.float32)
_TEXTURE = np.array([6.0, 10.0, 10.0, 14.0, 12.0, 10.0], np.float32)  # noise sd per class


def _wave(width: int, base: float, rng: np.random.Generator, amplitude: float) -> np.ndarray:
  """A smooth boundary height per column: base + a random low-frequency sine mix."""
  x = np.arange(width, dtype=np.float32) / max(width, 1)
  y = np.full(width, base, np.float32)
  for k in (1, 2, 3):
    y += amplitude / k * np.sin(2 * np.pi * (k * x + rng.random()))
  return y


def scene(height: int, width: int, rng: np.random.Generator) -> tuple:
  """One scene: (uint8 image (H, W, 3), uint8 label map (H, W) of class ids / 255)."""
  h, w = height, width
  rows = np.arange(h, dtype=np.float32)[:, None]
  cols = np.arange(w, dtype=np.float32)[None, :]
  labels = np.full((h, w), 3, np.uint8)                       # grass by default
  horizon = _wave(w, rng.uniform(0.3, 0.55) * h, rng, 0.04 * h)
  labels[rows < horizon[None, :]] = 0                         # sky
  ground = rows >= horizon[None, :]
  if rng.random() < 0.6:                                      # a lake or the sea, a beach
    shore = _wave(w, horizon.mean() + rng.uniform(0.15, 0.3) * h, rng, 0.05 * h)
    beach = shore + rng.uniform(0.06, 0.15) * h
    labels[ground & (rows < shore[None, :])] = 1
    labels[ground & (rows >= shore[None, :]) & (rows < beach[None, :])] = 2
  for _ in range(rng.integers(0, 3)):                         # rocks: ellipses on the ground
    cy, cx = rng.uniform(horizon.mean() + 0.1 * h, h), rng.uniform(0, w)
    ry, rx = rng.uniform(0.05, 0.12) * h, rng.uniform(0.06, 0.15) * w
    inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
    labels[inside & (labels >= 2)] = 4
  for _ in range(rng.integers(0, 4)):                         # trees: a crown on a trunk
    cx = rng.uniform(0, w)
    base = horizon[int(np.clip(cx, 0, w - 1))] + rng.uniform(0.05, 0.25) * h
    if labels[int(min(base, h - 1)), int(np.clip(cx, 0, w - 1))] != 3:
      continue                                                # trees grow on grass only
    r = rng.uniform(0.07, 0.14) * h
    crown = (rows - (base - 2.2 * r)) ** 2 + (cols - cx) ** 2 <= r * r
    trunk = (np.abs(cols - cx) <= max(1.0, 0.2 * r)) & (rows >= base - 1.5 * r) & (rows <= base)
    labels[crown | trunk] = 5

  # Paint: base colour, per-class texture noise, a vertical sky gradient, water stripes.
  image = CLASS_COLORS[labels].copy()
  noise = rng.normal(size=(h, w, 1)).astype(np.float32)
  image += noise * _TEXTURE[labels][..., None]
  sky = labels == 0
  image[sky] += (rows / h * 90.0 * np.ones((1, w)))[sky][:, None] * np.array([0.9, 0.6, 0.1])
  water = labels == 1
  stripes = 12.0 * np.sin(rows * 1.3 + 0.3 * cols) * np.ones((1, w))
  image[water] += stripes[water][:, None]
  image = np.clip(image, 0, 255).astype(np.uint8)

  # The horizon's boundary pixels are unlabelled (a 1-pixel band, as VOC's borders).
  edge = np.zeros((h, w), bool)
  edge[1:] |= (labels[1:] == 0) != (labels[:-1] == 0)
  labels = labels.copy()
  labels[edge] = IGNORE_LABEL
  return image, labels


def write_scene_folder(output: str, num_images: int, height: int = 48, width: int = 64,
                       seed: int = 0) -> str:
  """Writes `num_images` scene pairs under `output` (images/, labels/); returns `output`.

  Deterministic for a seed: scene i is drawn from a generator seeded by (seed, i).
  """
  if num_images < 1:
    raise ValueError(f"--num_images={num_images}: must be >= 1")
  if min(height, width) < 8:
    raise ValueError(f"--height={height} --width={width}: both must be >= 8")
  image_dir, label_dir = os.path.join(output, "images"), os.path.join(output, "labels")
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(label_dir, exist_ok=True)
  for i in range(num_images):
    image, labels = scene(height, width, np.random.default_rng([seed, i]))
    name = f"scene_{i:05d}.png"
    Image.fromarray(image).save(os.path.join(image_dir, name))
    Image.fromarray(labels, mode="L").save(os.path.join(label_dir, name))
  return output


def _define_flags():
  flags.DEFINE_string("output", None, "Folder to write images/ and labels/ into.")
  flags.DEFINE_integer("num_images", 400, "Number of scenes.")
  flags.DEFINE_integer("height", 48, "Scene height in pixels.")
  flags.DEFINE_integer("width", 64, "Scene width in pixels.")
  flags.DEFINE_integer("seed", 0, "Scene i is drawn from a generator seeded by (seed, i).")


def main(argv: Sequence[str]):
  cli.no_positional_args(argv)
  cli.require_flags("output")
  f = flags.FLAGS
  out = write_scene_folder(f.output, f.num_images, f.height, f.width, f.seed)
  print(f"wrote {f.num_images} scene pairs to {out}/images and {out}/labels "
        f"({len(CLASS_NAMES)} classes: {', '.join(CLASS_NAMES)}; ignore label {IGNORE_LABEL})")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
