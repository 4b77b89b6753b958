"""Image grids: layout, upscaling, labels."""

import numpy as np

from vqgan_jax import visualize


def _images(n, h=8, w=8, value=0.0):
  return np.full((n, h, w, 3), value, np.float32)


def test_grid_cells_upscaled_and_placed():
  a = np.linspace(-1, 1, 2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
  grid = visualize.make_grid([a], pad=1, scale=3)
  assert grid.shape == (1 + 12 + 1, 1 + 2 * (12 + 1), 3)
  cell = grid[1:13, 1:13]
  expected = np.repeat(np.repeat(visualize.to_uint8(a[0]), 3, 0), 3, 1)
  np.testing.assert_array_equal(cell, expected)
  second = grid[1:13, 14:26]
  np.testing.assert_array_equal(second, np.repeat(np.repeat(visualize.to_uint8(a[1]), 3, 0), 3, 1))


def test_default_scale_reaches_min_cell_size():
  grid = visualize.make_grid([_images(1, 32, 32)], pad=0)
  assert grid.shape[0] >= visualize.MIN_CELL_PIXELS
  assert grid.shape[0] % 32 == 0


def test_short_rows_are_padded_blank():
  grid = visualize.make_grid([_images(3, value=-1.0), _images(1, value=-1.0)], pad=0, scale=1)
  assert grid.shape[:2] == (16, 24)
  assert (grid[8:, 8:] == visualize.BACKGROUND).all()   # the missing cells stay blank
  assert (grid[8:, :8] == 0).all()


def test_labels_add_margins_with_text():
  plain = visualize.make_grid([_images(2), _images(2)], scale=2)
  labelled = visualize.make_grid([_images(2), _images(2)], scale=2,
                                 row_labels=["original", "sample"], col_labels=["#0", "#1"])
  assert labelled.shape[0] > plain.shape[0] and labelled.shape[1] > plain.shape[1]
  margin = labelled[:, :labelled.shape[1] - plain.shape[1]]
  assert (margin < 128).any()   # text was drawn in the left margin


def test_square_grid_is_near_square_and_captioned():
  grid = visualize.square_grid(_images(9, 16, 16), labels=[str(i) for i in range(9)], scale=2)
  plain = visualize.square_grid(_images(9, 16, 16), scale=2)
  assert plain.shape[0] == plain.shape[1]   # 3 x 3
  assert grid.shape[1] == plain.shape[1] and grid.shape[0] > plain.shape[0]


def test_condition_maps_show_in_palette():
  onehot = np.zeros((1, 2, 2, 5), np.float32)
  onehot[0, :, :, 3] = 1
  shown = visualize.displayable(onehot)
  np.testing.assert_allclose(shown[0, 0, 0], visualize.PALETTE[3] / 127.5 - 1.0)
