"""Pictures a person reads: image grids with labels, upscaled, saved as PNG.

Every picture the project writes (training reconstructions, samples, evaluation grids,
decoded token exports) goes through here: images are floats in [-1, 1] (RGB) or one-hot
/ id condition maps (shown in a fixed palette), grids are laid out with einops, small
images are upscaled by an integer factor (nearest neighbour, so pixels stay pixels) and
rows or columns carry text labels.
"""

import math
import os
from typing import List, Optional, Sequence

import einops
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Colours of segment ids in the condition maps (cycled when there are more segments).
PALETTE = np.array([
    [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
    [0, 0, 0], [255, 255, 255]], np.float32)

# Grids of small images are upscaled until a cell is at least this many pixels high.
MIN_CELL_PIXELS = 96
PAD = 2
LABEL_HEIGHT = 14
BACKGROUND = 255


def colorize_segments(segmentation: np.ndarray) -> np.ndarray:
  """Segment ids (..., H, W) -> RGB in [-1, 1] with a fixed palette."""
  rgb = PALETTE[np.asarray(segmentation) % len(PALETTE)]
  return rgb / 127.5 - 1.0


def displayable(images: np.ndarray) -> np.ndarray:
  """RGB stays; other channel counts (one-hot condition maps) show their argmax in colour."""
  images = np.asarray(images)
  if images.shape[-1] in (1, 3):
    return images
  return colorize_segments(np.argmax(images, axis=-1))


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def upscale_factor(height: int, min_pixels: int = MIN_CELL_PIXELS) -> int:
  """Integer nearest-neighbour factor that makes a `height`-pixel image >= min_pixels."""
  return max(1, math.ceil(min_pixels / max(height, 1)))


def _pad_row(row: np.ndarray, n: int) -> np.ndarray:
  if row.shape[0] == n:
    return row
  blank = np.full((n - row.shape[0],) + row.shape[1:], BACKGROUND, np.uint8)
  return np.concatenate([row, blank])


def make_grid(rows: Sequence[np.ndarray], pad: int = PAD, scale: Optional[int] = None,
              row_labels: Optional[Sequence[str]] = None,
              col_labels: Optional[Sequence[str]] = None) -> np.ndarray:
  """Rows of images (each (N, H, W, C) in [-1, 1]) -> one uint8 RGB grid.

  Rows shorter than the longest are padded with blank cells. `scale` upscales every
  cell (None: enough for MIN_CELL_PIXELS); `row_labels` are written left of each row,
  `col_labels` above each column.
  """
  cells = [to_uint8(displayable(r)) for r in rows]
  cells = [np.repeat(c, 3, axis=-1) if c.shape[-1] == 1 else c for c in cells]
  n = max(c.shape[0] for c in cells)
  h = cells[0].shape[1]
  scale = upscale_factor(h) if scale is None else scale
  stack = np.stack([_pad_row(c, n) for c in cells])                 # (R, N, H, W, 3)
  stack = stack.repeat(scale, axis=2).repeat(scale, axis=3)
  stack = np.pad(stack, ((0, 0), (0, 0), (pad, 0), (pad, 0), (0, 0)),
                 constant_values=BACKGROUND)
  grid = einops.rearrange(stack, "r n h w c -> (r h) (n w) c")
  grid = np.pad(grid, ((0, pad), (0, pad), (0, 0)), constant_values=BACKGROUND)
  if not row_labels and not col_labels:
    return grid
  return _add_labels(grid, stack.shape[2], stack.shape[3], row_labels, col_labels)


def _font():
  return ImageFont.load_default()


def _text_width(draw, text: str) -> int:
  left, _, right, _ = draw.textbbox((0, 0), text, font=_font())
  return right - left


def _add_labels(grid: np.ndarray, cell_h: int, cell_w: int, row_labels, col_labels):
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  left = (max(_text_width(probe, t) for t in row_labels) + 6) if row_labels else 0
  top = LABEL_HEIGHT + 2 if col_labels else 0
  canvas = Image.new("RGB", (grid.shape[1] + left, grid.shape[0] + top), (255,) * 3)
  canvas.paste(Image.fromarray(grid), (left, top))
  draw = ImageDraw.Draw(canvas)
  for i, text in enumerate(row_labels or ()):
    y = top + i * cell_h + PAD + (cell_h - PAD) // 2 - LABEL_HEIGHT // 2
    draw.text((2, y), text, fill=(0, 0, 0), font=_font())
  for j, text in enumerate(col_labels or ()):
    x = left + j * cell_w + PAD
    draw.text((x, 1), text, fill=(0, 0, 0), font=_font())
  return np.asarray(canvas)


def square_grid(images: np.ndarray, labels: Optional[Sequence[str]] = None,
                scale: Optional[int] = None) -> np.ndarray:
  """N images (N, H, W, C) in a near-square grid, each optionally captioned."""
  images = np.asarray(images)
  n = images.shape[0]
  cols = math.ceil(math.sqrt(n))
  rows = [images[i:i + cols] for i in range(0, n, cols)]
  if labels is None:
    return make_grid(rows, scale=scale)
  captions = [list(labels[i:i + cols]) for i in range(0, n, cols)]
  return _captioned(rows, captions, scale)


def _captioned(rows: List[np.ndarray], captions: List[List[str]], scale) -> np.ndarray:
  """Each row of cells gets its own caption line above it."""
  parts = []
  for row, texts in zip(rows, captions):
    cols = max(r.shape[0] for r in rows)
    parts.append(make_grid([row], scale=scale, col_labels=list(texts) + [""] *
                           (cols - len(texts))))
  width = max(p.shape[1] for p in parts)
  parts = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=BACKGROUND)
           for p in parts]
  return np.concatenate(parts)


def save_png(path: str, image: np.ndarray) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(image).save(path)
  return path
