"""Tests of the input pipelines in vqgan_jax.data (photos, folder, tfds)."""

import logging
import os
import re

import grain
import numpy as np
import pytest
from PIL import Image

from vqgan_jax import data
from vqgan_jax.data.photos import prepare_photos, segment_photos

S = 16  # crop size used throughout: small keeps every test fast


def photos_config(**overrides):
  c = data.default_data_config()
  c.image_size = S
  c.photos.train_examples_per_epoch = 64
  for k, v in overrides.items():
    c[k] = v
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def to_uint8(image):
  return np.round((image + 1.0) * 127.5).astype(np.uint8)


def find_windows(photo_image, crop):
  """All (y, x) where `crop` (uint8 S x S x 3) occurs exactly in the photo."""
  h, w = photo_image.shape[:2]
  s = crop.shape[0]
  ys, xs = np.nonzero(np.all(photo_image[:h - s + 1, :w - s + 1] == crop[0, 0], axis=-1))
  return [(y, x) for y, x in zip(ys, xs)
          if np.array_equal(photo_image[y:y + s, x:x + s], crop)]


def inside(y, x, s, box):
  by, bx, bh, bw = box
  return by <= y and y + s <= by + bh and bx <= x and x + s <= bx + bw


def boxes_overlap(a, b):
  ay, ax, ah, aw = a
  by, bx, bh, bw = b
  return ay < by + bh and by < ay + ah and ax < bx + bw and bx < ax + aw


# ----------------------------------------------------------------------------
# Photos.


def test_default_config_has_all_fields():
  c = data.default_data_config()
  assert {"name", "image_size", "random_flip", "num_workers", "photos", "folder",
          "seg_folder", "tfds", "label_maps"} <= set(c.keys())
  assert set(c.photos.keys()) == {"photo_short_side", "val_fraction", "num_segments",
                                  "train_examples_per_epoch"}
  assert set(c.folder.keys()) == {"folder_path", "class_from_subfolder", "strict",
                                  "val_fraction"}
  assert set(c.tfds.keys()) == {"tfds_name", "tfds_data_dir", "train_split", "val_split",
                                "image_key", "label_key", "mask_key"}
  assert set(c.seg_folder.keys()) == {"folder_path", "image_dir", "label_dir", "strict",
                                      "val_fraction"}
  assert set(c.label_maps.keys()) == {"num_classes", "ignore_label", "ignore_as"}
  assert c.name == "photos"


def test_photos_info_and_train_batch():
  c = photos_config()
  info = data.dataset_info(c)
  assert info["class_names"] == list(data.PHOTO_NAMES)  # every photo loads offline
  assert info["num_classes"] == 7 and info["num_segments"] == 8
  assert info["num_train"] == 64
  batch = next(data.make_train_iterator(c, batch_size=8, seed=0))
  assert set(batch) == {"image", "label", "segmentation"}
  assert batch["image"].shape == (8, S, S, 3) and batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert np.all((0 <= batch["label"]) & (batch["label"] < 7))
  assert batch["segmentation"].shape == (8, S, S) and batch["segmentation"].dtype == np.int32
  assert np.all((0 <= batch["segmentation"]) & (batch["segmentation"] < 8))


def test_photos_eval_is_finite_deterministic_and_padded():
  c = photos_config()
  num_val = data.dataset_info(c)["num_val"]
  expected = sum(len(p.val_windows) for p in data.photo_layout(c))
  assert num_val == expected > 0
  ev = data.make_eval_iterator(c, batch_size=12)
  first, second = list(ev), list(ev)
  assert_batches_equal(first, second)
  assert len(first) == data.num_eval_batches(c, batch_size=12) == -(-num_val // 12)
  for b in first:
    assert set(b) == {"image", "label", "segmentation", "mask"}
    assert b["image"].shape == (12, S, S, 3) and b["mask"].dtype == np.bool_
  masks = np.concatenate([b["mask"] for b in first])
  assert masks.sum() == num_val and not masks[num_val:].any()
  # drop_remainder keeps only full batches of real examples.
  dropped = list(data.make_eval_iterator(c, batch_size=12, drop_remainder=True))
  assert len(dropped) == num_val // 12 and all(b["mask"].all() for b in dropped)


def test_photos_train_and_val_regions_are_disjoint():
  c = photos_config(random_flip=False)
  photos = data.photo_layout(c)
  for p in photos:
    h, w = p.image.shape[:2]
    assert min(h, w) == c.photos.photo_short_side
    assert not boxes_overlap(p.train_box, p.val_box)
    assert inside(*p.train_box[:2], S, (0, 0, h, w)) and inside(*p.val_box[:2], S, (0, 0, h, w))
    for i, win in enumerate(p.val_windows):
      assert inside(win[0], win[1], S, p.val_box)
      assert not any(boxes_overlap(win, other) for other in p.val_windows[i + 1:])
  # Every training crop is found inside its photo's train region, with the
  # segmentation cut from the same window.
  batch = next(data.make_train_iterator(c, batch_size=16, seed=3))
  for image, label, seg in zip(batch["image"], batch["label"], batch["segmentation"]):
    p = photos[label]
    hits = find_windows(p.image, to_uint8(image))
    # `any`: a flat patch may also occur elsewhere; a val-region crop has no hit here.
    assert any(inside(y, x, S, p.train_box) for y, x in hits)
    assert any(np.array_equal(p.segmentation[y:y + S, x:x + S], seg) for y, x in hits)
  # Eval crops are exactly the val windows.
  ev = next(iter(data.make_eval_iterator(c, batch_size=4)))
  y, x, _, _ = photos[0].val_windows[0]
  np.testing.assert_array_equal(to_uint8(ev["image"][0]), photos[0].image[y:y + S, x:x + S])


def test_photos_flip_flips_image_and_segmentation_together():
  c = photos_config(random_flip=True)
  photos = data.photo_layout(c)
  batch = next(data.make_train_iterator(c, batch_size=16, seed=0))
  flipped = 0
  for image, label, seg in zip(batch["image"], batch["label"], batch["segmentation"]):
    p, crop = photos[label], to_uint8(image)
    hits = find_windows(p.image, crop)
    if not hits:  # Not found as is: must be a mirrored crop.
      hits = find_windows(p.image, crop[:, ::-1])
      seg = seg[:, ::-1]
      flipped += 1
    assert any(np.array_equal(p.segmentation[y:y + S, x:x + S], seg) for y, x in hits)
  assert 0 < flipped < 16


def test_photos_segmentation_is_reproducible():
  c = photos_config()
  before = [p.segmentation.copy() for p in data.photo_layout(c)]
  segment_photos.cache_clear()
  prepare_photos.cache_clear()
  after = [p.segmentation for p in data.photo_layout(c)]
  for a, b in zip(before, after):
    np.testing.assert_array_equal(a, b)
  assert len(np.unique(np.concatenate([s.ravel() for s in after]))) == 8


# ----------------------------------------------------------------------------
# Determinism and resumption.


def test_same_seed_same_batches_different_seed_differs():
  c = photos_config()
  a = take(data.make_train_iterator(c, batch_size=4, seed=7), 3)
  b = take(data.make_train_iterator(c, batch_size=4, seed=7), 3)
  assert_batches_equal(a, b)
  other = take(data.make_train_iterator(c, batch_size=4, seed=8), 3)
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, other))


def test_epochs_are_reshuffled():
  c = photos_config()
  c.photos.train_examples_per_epoch = 14
  it = data.make_train_iterator(c, batch_size=14, seed=0)
  e1, e2 = take(it, 2)
  # Each epoch holds every photo twice, in a different order.
  assert sorted(e1["label"]) == sorted(e2["label"]) == sorted(list(range(7)) * 2)
  assert not np.array_equal(e1["label"], e2["label"])


def test_resume_from_state():
  c = photos_config()
  it = data.make_train_iterator(c, batch_size=4, seed=1)
  take(it, 2)
  state = it.get_state()
  expected = take(it, 2)
  it2 = data.make_train_iterator(c, batch_size=4, seed=1)
  it2.set_state(state)
  assert_batches_equal(take(it2, 2), expected)


def test_resume_through_orbax(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  c = photos_config()
  it = data.make_train_iterator(c, batch_size=4, seed=2)
  take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = take(it, 2)
  it2 = data.make_train_iterator(c, batch_size=4, seed=2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
  assert_batches_equal(take(it2, 2), expected)


# ----------------------------------------------------------------------------
# Image folder.


def _save_rgb(path, color, size=(24, 20)):
  Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(path)


@pytest.fixture
def image_folder(tmp_path):
  """Two classes with RGB PNG/JPG files, grayscale, RGBA, 16-bit and a corrupt JPEG."""
  root = tmp_path / "images"
  (root / "cats" / "nested").mkdir(parents=True)
  (root / "dogs").mkdir()
  for i in range(4):
    _save_rgb(root / "cats" / f"c{i}.png", (200, 10 * i, 0))
    _save_rgb(root / "dogs" / f"d{i}.JPG", (0, 10 * i, 200))
  _save_rgb(root / "cats" / "nested" / "deep.jpeg", (50, 50, 50))
  Image.fromarray(np.full((20, 24), 90, np.uint8)).save(root / "cats" / "gray.png")
  rgba = np.zeros((20, 24, 4), np.uint8)
  rgba[:, :12] = (10, 20, 30, 255)  # left half opaque, right half transparent
  Image.fromarray(rgba).save(root / "dogs" / "rgba.png")
  Image.fromarray(np.full((20, 24), 257 * 100, np.uint16)).save(root / "dogs" / "g16.png")
  # A JPEG cut in half: opens fine, fails when decoded.
  _save_rgb(root / "dogs" / "good.jpg", (1, 2, 3), size=(64, 64))
  raw = (root / "dogs" / "good.jpg").read_bytes()
  (root / "dogs" / "good.jpg").unlink()
  (root / "dogs" / "broken.jpg").write_bytes(raw[:len(raw) // 2])
  (root / "dogs" / "notes.txt").write_text("not an image")
  return root


def folder_config(root, **folder):
  c = data.default_data_config()
  c.name = "folder"
  c.image_size = S
  c.folder.folder_path = str(root)
  c.folder.val_fraction = 0.25
  for k, v in folder.items():
    c.folder[k] = v
  return c


def test_decode_converts_to_rgb(image_folder):
  gray = data.decode_image(str(image_folder / "cats" / "gray.png"))
  assert gray.shape == (20, 24, 3) and gray.dtype == np.uint8 and np.all(gray == 90)
  rgba = data.decode_image(str(image_folder / "dogs" / "rgba.png"))
  assert rgba.shape == (20, 24, 3)
  assert np.all(rgba[:, :12] == (10, 20, 30)) and np.all(rgba[:, 12:] == 255)  # on white
  g16 = data.decode_image(str(image_folder / "dogs" / "g16.png"))
  assert g16.shape == (20, 24, 3) and np.all(g16 == 100)
  assert np.array_equal(data.to_rgb_uint8(np.full((2, 2, 1), 7, np.uint8)),
                        np.full((2, 2, 3), 7, np.uint8))


def test_folder_classes_skips_and_batches(image_folder, caplog):
  c = folder_config(image_folder)
  with caplog.at_level(logging.WARNING):
    info = data.dataset_info(c)
  assert "skipped 1 unreadable" in caplog.text and "broken.jpg" in caplog.text
  assert info["class_names"] == ["cats", "dogs"] and info["num_classes"] == 2
  assert info["num_skipped"] == 1
  assert [os.path.basename(p) for p in data.folder_skipped_files(c)] == ["broken.jpg"]
  readable = 4 + 4 + 1 + 1 + 1 + 1  # .JPG counts; .txt and the broken file do not
  assert info["num_train"] + info["num_val"] == readable
  assert info["num_val"] == round(0.25 * readable)
  batch = next(data.make_train_iterator(c, batch_size=4, seed=0))
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (4, S, S, 3) and batch["image"].dtype == np.float32
  assert np.all(np.isin(batch["label"], [0, 1]))
  evals = list(data.make_eval_iterator(c, batch_size=2))
  assert sum(int(b["mask"].sum()) for b in evals) == info["num_val"]
  # Without class folders every label is 0.
  c0 = folder_config(image_folder, class_from_subfolder=False)
  assert data.dataset_info(c0)["num_classes"] == 1
  assert np.all(next(data.make_train_iterator(c0, batch_size=4, seed=0))["label"] == 0)


def test_folder_resizes_shorter_side_and_center_crops(tmp_path):
  root = tmp_path / "wide"
  (root / "a").mkdir(parents=True)
  left_mid_right = np.zeros((S * 2, S * 6, 3), np.uint8)
  left_mid_right[:, S * 2:S * 4] = 255  # white middle third, black sides
  Image.fromarray(left_mid_right).save(root / "a" / "x.png")
  c = folder_config(root, val_fraction=1.0)
  b = next(iter(data.make_eval_iterator(c, batch_size=1)))
  # Shorter side 2S -> S makes the image S x 3S; the centre crop is the white middle.
  assert np.all(b["image"][0][:, 2:-2] > 0.9)


def test_folder_strict_names_the_corrupt_file(image_folder):
  with pytest.raises(ValueError, match="broken.jpg"):
    data.dataset_info(folder_config(image_folder, strict=True))


def test_folder_empty_or_unreadable_raises(tmp_path):
  empty = tmp_path / "empty"
  (empty / "a").mkdir(parents=True)
  with pytest.raises(ValueError, match=re.escape(str(empty))):
    data.make_train_iterator(folder_config(empty), batch_size=2, seed=0)
  bad = tmp_path / "bad"
  (bad / "a").mkdir(parents=True)
  (bad / "a" / "x.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match=re.escape(str(bad))):
    data.dataset_info(folder_config(bad))


def test_processes_read_disjoint_records(tmp_path):
  root = tmp_path / "colors"
  (root / "a").mkdir(parents=True)
  for i in range(10):  # S x S images of unique colours: crops are whole images
    _save_rgb(root / "a" / f"{i}.png", (20 * i, 0, 0), size=(S, S))
  c = folder_config(root, val_fraction=0.0)
  c.random_flip = False
  seen = []
  for p in range(2):
    # One batch is one epoch of this process's shard.
    b = next(data.make_train_iterator(c, batch_size=5, seed=0, process_index=p, process_count=2))
    seen.append({int(v) for v in to_uint8(b["image"])[:, 0, 0, 0]})
    assert len(seen[-1]) == 5
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {20 * i for i in range(10)}
  # Eval: equal batch counts, disjoint real examples, all of them covered.
  c.folder.val_fraction = 1.0
  evals = [list(data.make_eval_iterator(c, batch_size=4, process_index=p, process_count=3))
           for p in range(3)]
  assert len({len(e) for e in evals}) == 1
  colors = [int(v) for e in evals for b in e for v in to_uint8(b["image"])[b["mask"]][:, 0, 0, 0]]
  assert sorted(colors) == [20 * i for i in range(10)]


# ----------------------------------------------------------------------------
# TFDS.


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")
  data_dir = tmp_path_factory.mktemp("tfds")
  rng = np.random.default_rng(0)

  def examples(n, prefix):
    return [(f"{prefix}{i}", {"image": rng.integers(0, 256, (S + 4 + i, S + 8, 3), np.uint8),
                              "label": i % 2}) for i in range(n)]

  tfds.dataset_builders.store_as_tfds_dataset(
      name="vqgan_tiny_images", version="1.0.0",
      features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=2)}),
      split_datasets={"train": examples(6, "t"), "validation": examples(3, "v")},
      config=None, data_dir=str(data_dir), file_format="array_record")
  return str(data_dir)


def test_tfds_train_and_eval(tiny_tfds):
  c = data.default_data_config()
  c.name = "tfds"
  c.image_size = S
  c.tfds.tfds_name = "vqgan_tiny_images"
  c.tfds.tfds_data_dir = tiny_tfds
  info = data.dataset_info(c)
  assert info["num_classes"] == 2 and info["num_train"] == 6 and info["num_val"] == 3
  it = data.make_train_iterator(c, batch_size=4, seed=0)
  batches = take(it, 2)
  assert batches[0]["image"].shape == (4, S, S, 3)
  assert np.all(np.isin(np.concatenate([b["label"] for b in batches]), [0, 1]))
  evals = list(data.make_eval_iterator(c, batch_size=2))
  assert len(evals) == 2 and sum(int(b["mask"].sum()) for b in evals) == 3
  assert np.all(np.abs(evals[0]["image"]) <= 1.0)
  c.tfds.label_key = ""
  assert np.all(next(data.make_train_iterator(c, batch_size=2, seed=0))["label"] == 0)


def test_tfds_prepared_as_tfrecord_says_how_to_convert(tmp_path):
  """tfds.data_source cannot read TFRecord (the default format of many builders): the
  pipeline names the dataset and data dir and gives the ArrayRecord commands."""
  tfds = pytest.importorskip("tensorflow_datasets")
  data_dir = str(tmp_path / "tfds")
  rng = np.random.default_rng(1)
  tfds.dataset_builders.store_as_tfds_dataset(
      name="vqgan_tfrecord_images", version="1.0.0",
      features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=2)}),
      split_datasets={"train": [(f"t{i}", {"image": rng.integers(0, 256, (S, S, 3), np.uint8),
                                           "label": i % 2}) for i in range(2)]},
      config=None, data_dir=data_dir, file_format="tfrecord")
  version_dir = os.path.join(data_dir, "vqgan_tfrecord_images", "1.0.0")
  assert any(".tfrecord-" in f for f in os.listdir(version_dir))
  c = data.default_data_config()
  c.name = "tfds"
  c.image_size = S
  c.tfds.tfds_name = "vqgan_tfrecord_images"
  c.tfds.tfds_data_dir = data_dir
  for call in (lambda: data.make_train_iterator(c, batch_size=2, seed=0),
               lambda: data.dataset_info(c)):
    with pytest.raises(ValueError) as err:
      call()
    msg = str(err.value)
    assert "'vqgan_tfrecord_images'" in msg and f"data_dir {data_dir} " in msg
    assert "only as tfrecord" in msg and "array_record" in msg
    assert (f"tfds convert_format --dataset_version_dir={version_dir} "
            "--out_file_format=array_record") in msg
    assert (f"tfds build vqgan_tfrecord_images --data_dir={data_dir} "
            "--file_format=array_record") in msg


# ----------------------------------------------------------------------------
# Worker processes.


@pytest.mark.slow
def test_worker_processes_give_the_same_batches():
  c = photos_config()
  expected = take(data.make_train_iterator(c, batch_size=4, seed=5), 2)
  c.num_workers = 1
  it = data.make_train_iterator(c, batch_size=4, seed=5)
  try:
    assert_batches_equal(take(it, 2), expected)
  finally:
    it.close()
